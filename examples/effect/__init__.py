"""The paper's effect at toy scale: ``make effect`` (``python -m examples.effect.run``).

A tiny Llama is pretrained on a synthetic language (v1), fine-tuned on a task with exact answers
(v1-ft), continued into a new version (v2), and the fine-tune's difference is transferred onto v2
with graft, and onto an unrelated model (v2') as the control. ``corpus`` makes the data,
``model`` the tokenizer, the model and the training loop, ``evaluate`` the measures, ``run`` the
protocol, ``render`` the table (it imports nothing heavy: the docs build uses it).
"""
