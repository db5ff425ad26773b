"""Where a cut stream continues from, and what its continuation must repeat. Pure.

A rank's text is whole only at some token boundaries: vLLM's detokenizer holds a token's bytes
back while they end inside a character (a CJK character or an emoji is 2-4 byte-level tokens),
and a prompt of ids that ends inside one makes vLLM's next detokenizer emit the prompt's own text
(system prompt included). So a continuation starts from a chunk's end whose tokens decode whole
(the passage asks the new rank's /detokenize: its text must not end in U+FFFD, vLLM's own test
for held-back bytes), drops the tokens after that point from its prompt, and the new rank
generates them again. Those tokens, and the text of them the client already read, must come back
the same, and are then not sent twice; else the continuation is not the same answer (`Diverged`)
and the stream is cut with an error event. A sampled stream whose client read nothing past the
point continues as a new sample, as documented.
"""

from __future__ import annotations


class Diverged(Exception):
    """A continuation's tokens or text differ from what the client already read of the answer:
    it is not the same answer, and the stream is cut with an error event."""


class Seam:
    """One stream's chunk ends (where a continuation may start) and, during a continuation, what
    it has yet to repeat."""

    def __init__(self) -> None:
        self.ends: list[tuple[int, int]] = [(0, 0)]  # per chunk end: (tokens generated, characters read)
        # the text the ranks sent, in order: kept in pieces, joined only at a cut (a chunk costs
        # one append, not a copy of the whole answer so far)
        self._pieces: list[str] = []
        self._chars = 0
        self._ids: list[int] = []  # tokens a continuation must generate again, not yet seen
        self._read = ""  # text a continuation must send again, not yet seen

    @property
    def replaying(self) -> bool:
        return bool(self._ids or self._read)

    @property
    def text(self) -> str:
        """The text the ranks sent, in order (read at a cut, not per chunk)."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def read(self, generated: int, piece: str) -> None:
        """A chunk went by: `generated` tokens in all, `piece` its text."""
        if piece:
            self._pieces.append(piece)
            self._chars += len(piece)
        if generated > self.ends[-1][0]:
            self.ends.append((generated, self._chars))

    def points(self, limit: int) -> list[tuple[int, int]]:
        """The chunk ends a continuation may start from, latest first, at most `limit`."""
        return self.ends[::-1][:limit]

    def resume_at(self, point: tuple[int, int], generated: list[int]) -> None:
        """The continuation starts after `point`'s tokens: what it must repeat."""
        tokens, chars = point
        self._ids, self._read = generated[tokens:], self.text[chars:]

    def replayed(self, tokens: list[int], piece: str, finished: bool) -> tuple[list[int], str]:
        """A continuation's chunk, less what it repeated; raises Diverged where it differs."""
        n = min(len(tokens), len(self._ids))
        if tokens[:n] != self._ids[:n]:
            raise Diverged(f"the continuation generated other tokens than the client read ({tokens[:n]} "
                           f"for {self._ids[:n]})")
        m = min(len(piece), len(self._read))
        if piece[:m] != self._read[:m]:
            raise Diverged("the continuation's text differs from what the client read")
        self._ids, self._read = self._ids[n:], self._read[m:]
        if finished and self.replaying:
            raise Diverged("the continuation ended before the point the client had read to")
        return tokens[n:], piece[m:]
