"""The eight NPR tags and the token kinds the grammar is written over.

Both the token-level parser (training masks, engine, PAPO filter) and the text-level format
reward reduce their input to the same stream of `Kind`s, so there is exactly one grammar.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Iterable, Mapping, Sequence

NPR_TAGS: tuple[str, ...] = (
    "<guideline>", "</guideline>", "<plan>", "</plan>",
    "<step>", "</step>", "<takeaway>", "</takeaway>",
)


class Kind(IntEnum):
    """What one token (or one text segment) is, as far as the grammar is concerned."""
    TEXT = 0
    SPACE = 1  # whitespace only
    GUIDE_O = 2
    GUIDE_C = 3
    PLAN_O = 4
    PLAN_C = 5
    STEP_O = 6
    STEP_C = 7
    TAKE_O = 8
    TAKE_C = 9


TAG_KINDS: dict[str, Kind] = dict(zip(NPR_TAGS, (
    Kind.GUIDE_O, Kind.GUIDE_C, Kind.PLAN_O, Kind.PLAN_C,
    Kind.STEP_O, Kind.STEP_C, Kind.TAKE_O, Kind.TAKE_C)))
KIND_TAGS: dict[Kind, str] = {k: t for t, k in TAG_KINDS.items()}
TAG_KIND_SET = frozenset(TAG_KINDS.values())


@dataclass(frozen=True)
class TagIds:
    """Token ids of the eight tags (tag string -> id), plus the ids of whitespace-only tokens.

    `space_ids` lets the parser tell "whitespace" (allowed between plans, after
    `</guideline>` and after `</takeaway>`) from text; without it every non-tag token is text.
    """
    ids: tuple[int, ...]  # in NPR_TAGS order
    space_ids: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self):
        if len(self.ids) != len(NPR_TAGS):
            raise ValueError(f"TagIds needs {len(NPR_TAGS)} ids, got {len(self.ids)}")
        if len(set(self.ids)) != len(self.ids):
            raise ValueError(f"TagIds: tag ids must be distinct, got {dict(zip(NPR_TAGS, self.ids))}")
        clash = set(self.ids) & set(self.space_ids)
        if clash:
            raise ValueError(f"TagIds: ids {sorted(clash)} are both tags and whitespace")
        object.__setattr__(self, "_kind_of", {i: TAG_KINDS[t] for t, i in zip(NPR_TAGS, self.ids)}
                           | {i: Kind.SPACE for i in self.space_ids})

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, int], space_ids: Iterable[int] = ()) -> "TagIds":
        missing = [t for t in NPR_TAGS if t not in mapping]
        if missing:
            raise ValueError(f"TagIds.from_mapping: missing tags {missing}")
        bad = {t: mapping[t] for t in NPR_TAGS if not isinstance(mapping[t], int) or mapping[t] < 0}
        if bad:
            raise ValueError(f"TagIds.from_mapping: ids must be non-negative ints, got {bad}")
        return cls(tuple(int(mapping[t]) for t in NPR_TAGS), frozenset(int(i) for i in space_ids))

    def __getitem__(self, tag: str) -> int:
        try:
            return self.ids[NPR_TAGS.index(tag)]
        except ValueError:
            raise KeyError(f"{tag!r} is not an NPR tag; tags are {NPR_TAGS}") from None

    def as_dict(self) -> dict[str, int]:
        return dict(zip(NPR_TAGS, self.ids))

    def id_of(self, kind: Kind) -> int:
        return self[KIND_TAGS[kind]]

    def kinds(self, token_ids: Sequence[int], response_start: int = 0) -> list[Kind]:
        """Kind of every token. Tokens before `response_start` (the prompt) are plain text:
        a prompt may quote the tags in its instructions."""
        if not 0 <= response_start <= len(token_ids):
            raise ValueError(f"response_start={response_start} outside [0, {len(token_ids)}]")
        kind_of = self._kind_of
        out = [Kind.TEXT] * response_start
        out.extend(kind_of.get(int(t), Kind.TEXT) for t in token_ids[response_start:])
        return out


_TAG_RE = re.compile("(" + "|".join(re.escape(t) for t in NPR_TAGS) + ")")


def lex_text(text: str) -> tuple[list[Kind], list[int]]:
    """Split text into tag / text / whitespace segments: (kinds, character offset of each)."""
    kinds: list[Kind] = []
    offsets: list[int] = []
    pos = 0
    for piece in _TAG_RE.split(text):
        if piece:
            kinds.append(TAG_KINDS.get(piece) or (Kind.SPACE if piece.isspace() else Kind.TEXT))
            offsets.append(pos)
        pos += len(piece)
    return kinds, offsets
