"""A byte-level tokenizer stored as ``glm5conv-tokenizer.json`` next to the weights.

Token ids ``offset .. offset+255`` are the bytes; ids below ``offset`` are special tokens. The
bundled trained tiny model uses it; checkpoints without the file work with token ids only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from glm5conv.errors import BadInputError

TOKENIZER_NAME = "glm5conv-tokenizer.json"


@dataclass(frozen=True)
class ByteTokenizer:
    offset: int
    special_tokens: dict[str, int]

    @property
    def vocab_size(self) -> int:
        return self.offset + 256

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - self.offset for i in ids if self.offset <= i < self.offset + 256).decode(
            "utf-8", errors="replace"
        )

    def to_json(self) -> dict:
        return {"type": "byte-level", "byte_offset": self.offset, "special_tokens": self.special_tokens}

    def save(self, folder: Path) -> None:
        (folder / TOKENIZER_NAME).write_text(json.dumps(self.to_json(), indent=2) + "\n")


def load_tokenizer(folder: Path) -> ByteTokenizer | None:
    path = Path(folder) / TOKENIZER_NAME
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("type") != "byte-level":
            raise ValueError(f"unknown type {data.get('type')!r}")
        return ByteTokenizer(
            int(data["byte_offset"]), {str(k): int(v) for k, v in data.get("special_tokens", {}).items()}
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise BadInputError(f"{path}: not a glm5conv byte-level tokenizer ({exc})") from None
