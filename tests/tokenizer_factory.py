"""Tiny tokenizers built in-process for tests: nothing is downloaded.

A byte-level BPE is trained on a few sentences (so any text round-trips exactly and tokens can straddle the
prompt/response boundary, as with real tokenizers) and wrapped in :class:`transformers.PreTrainedTokenizerFast`
with BOS/EOS/PAD tokens and a Jinja chat template. Each call trains a fresh tokenizer (a few milliseconds), so
a test can mutate it freely.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# ChatML: every turn ends with the special token <|im_end|>, the template's end-of-turn token.
CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A template with no end-of-turn token: the loader must append EOS so the model learns to stop.
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "Below is an instruction that describes a task, paired with an input that provides further context.",
    "### Instruction: ### Input: ### Response:",
    "What is the capital of France? The capital of France is Paris.",
    "Translate to German: good morning. Guten Morgen.",
    "user assistant system: hello, how are you? I am fine, thank you. Tell me a joke.",
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) , . ! ?",
    "Add the numbers 12 and 30. The sum is 42. Reverse the word cat: tac.",
]


def build_tokenizer(
    chat_template: str | None = CHATML_TEMPLATE, vocab_size: int = 320, add_bos: bool = True
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on :data:`CORPUS` and wrap it for transformers.

    Args:
        chat_template (str | None): Jinja chat template to set; ``None`` leaves the tokenizer without one.
            Defaults to ChatML (:data:`CHATML_TEMPLATE`).
        vocab_size (int): BPE vocabulary size including the 256 byte tokens and the special tokens. Default 320.
        add_bos (bool): Whether plain ``tokenizer(text)`` prepends ``<s>`` (as Llama tokenizers do). Default True.

    Returns:
        PreTrainedTokenizerFast: A fast tokenizer with ``<s>``, ``</s>``, ``<pad>``, ``<|im_start|>`` and
        ``<|im_end|>`` as special tokens.
    """
    specials = [PAD, BOS, EOS, IM_START, IM_END]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer=trainer)
    if add_bos:
        bos_id = backend.token_to_id(BOS)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer
