"""Builds the small tokenizer the simulated fleet ships with, with no download.

`python -m app.tokenizer_build [OUT_DIR]` trains a byte-level BPE on generated English-like text
(seeded, so the result is reproducible), adds BOS/EOS and ChatML markers, and writes a Hugging
Face style folder (`tokenizer.json`, `tokenizer_config.json` with a Jinja chat template) that
`transformers` and vLLM can also load.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from app.tokenizer import BUILTIN_TOKENIZER_DIR

VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
BOS, EOS = "<s>", "</s>"

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    # Tool definitions go in a system turn of their own, as tool-calling models' templates do.
    "{% if tools %}{{ '<|im_start|>system\n# Tools\n' }}"
    "{% for tool in tools %}{{ tool | tojson }}{{ '\n' }}{% endfor %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there been one all we their has would when if so no will more "
    "model token cache prefix request replica router gateway queue latency decode prefill batch "
    "system user assistant question answer cluster serve engine memory block stream time first "
    "what how why where who can could should please explain write summary code python data value "
    "number list error result test config deploy scale load balance priority tenant adapter weight"
).split()


def _corpus(lines: int = 4000, seed: int = 0) -> Iterator[str]:
    rng = random.Random(seed)
    punctuation = [".", ",", "?", "!", ":", ";"]
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 24))]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 9999)))
        text = " ".join(words)
        yield text[0].upper() + text[1:] + rng.choice(punctuation)


def build_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer


def write_tokenizer(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": "<unk>",
        "pad_token": EOS,
        "model_max_length": 1_000_000,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":
    write_tokenizer(Path(sys.argv[1]) if len(sys.argv) > 1 else BUILTIN_TOKENIZER_DIR)
