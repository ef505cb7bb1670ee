"""The computational graph of a GPT-2 whose edges the circuit analysis scores (MIB's naming).

Senders (what writes into the residual stream): `input` (token + position embeddings), every head
`a{l}.h{h}` (its z through its slice of c_proj, without the bias, which is the same in every run) and
every MLP `m{l}`. Readers (what reads it): every head's query, key and value input `a{l}.h{h}<q>`,
`<k>`, `<v>` (the residual stream before ln_1, read by that head alone), every MLP's input `m{l}`
(before ln_2) and `logits` (before ln_f). An edge `SENDER->READER` exists when the sender comes
before the reader: heads and MLPs of earlier layers, and an MLP reads its own layer's heads too.
GPT-2 small: 158 nodes (input, 144 heads, 12 MLPs, logits), 32,491 edges.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from patching.core.errors import PatchingError

INPUTS = ("q", "k", "v")


@dataclass(frozen=True)
class Graph:
    n_layer: int
    n_head: int

    @classmethod
    def of(cls, config) -> "Graph":
        return cls(config.n_layer, config.n_head)

    # ------------------------------------------------------------------ nodes

    @cached_property
    def senders(self) -> list[str]:
        """input, then per layer its heads and its MLP (forward order)."""
        out = ["input"]
        for l in range(self.n_layer):
            out += [f"a{l}.h{h}" for h in range(self.n_head)] + [f"m{l}"]
        return out

    @cached_property
    def readers(self) -> list[str]:
        """Per layer each head's q, k, v input and the MLP's input, then logits."""
        out = []
        for l in range(self.n_layer):
            out += [f"a{l}.h{h}<{i}>" for h in range(self.n_head) for i in INPUTS] + [f"m{l}"]
        return out + ["logits"]

    @cached_property
    def nodes(self) -> list[str]:
        """The graph's nodes: the senders and logits (a head's three inputs are one node)."""
        return [*self.senders, "logits"]

    def sender_rank(self, i: int) -> float:
        """Where a sender writes: -1 (input), l for layer l's heads, l + 0.5 for its MLP."""
        name = self.senders[i]
        if name == "input":
            return -1
        return int(name[1:].split(".")[0]) + (0.5 if name.startswith("m") else 0.0)

    def reader_rank(self, j: int) -> float:
        """Where a reader reads: l for layer l's heads, l + 0.5 for its MLP, n_layer for logits."""
        name = self.readers[j]
        if name == "logits":
            return self.n_layer
        return int(name[1:].split(".")[0].split("<")[0]) + (0.5 if name.startswith("m") else 0.0)

    # ------------------------------------------------------------------ edges

    @cached_property
    def adjacency(self) -> np.ndarray:
        """(n_readers, n_senders) bool: whether the edge exists."""
        s = np.array([self.sender_rank(i) for i in range(len(self.senders))])
        r = np.array([self.reader_rank(j) for j in range(len(self.readers))])
        return s[None, :] < r[:, None]

    @cached_property
    def edges(self) -> np.ndarray:
        """(n_edges, 2) (reader, sender) indices, reader-major in forward order."""
        return np.argwhere(self.adjacency)

    @cached_property
    def names(self) -> list[str]:
        return [f"{self.senders[s]}->{self.readers[r]}" for r, s in self.edges]

    @cached_property
    def index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.edges)

    def describe(self) -> str:
        return f"{len(self.nodes)} nodes, {len(self):,} edges"

    # ------------------------------------------------------------------ choosing edges by name

    def select(self, patterns: list[str], where: str) -> np.ndarray:
        """Edge indices named by `patterns`: exact edge names or shell wildcards (`a*.h*->logits`,
        `*->a2.h1<v>`); a pattern that names no edge of this graph is an error."""
        chosen = np.zeros(len(self), dtype=bool)
        for p in patterns:
            if not isinstance(p, str) or "->" not in p:
                raise PatchingError(f"{where}: {str(p)[:60]!r} is not an edge: write SENDER->READER, e.g. a0.h1->a1.h2<v>.")
            hits = [self.index[p]] if p in self.index else [i for i, n in enumerate(self.names) if fnmatch.fnmatchcase(n, p)]
            if not hits:
                raise PatchingError(f"{where}: {p[:60]!r} names no edge of this model's graph ({self.describe()}; "
                                    f"nodes input, a0.h0 .. a{self.n_layer - 1}.h{self.n_head - 1}, m0 .. m{self.n_layer - 1}, logits).")
            chosen[hits] = True
        return chosen

    def of_nodes(self, patterns: list[str], where: str) -> np.ndarray:
        """The edges among the nodes named by `patterns` (wildcards allowed), input and logits always
        included: a node circuit."""
        keep = {"input", "logits"}
        for p in patterns:
            if not isinstance(p, str):
                raise PatchingError(f"{where}: {str(p)[:60]!r} is not a node name.")
            hits = [n for n in self.nodes if fnmatch.fnmatchcase(n, p)]
            if not hits:
                raise PatchingError(f"{where}: {p[:60]!r} names no node of this model's graph ({self.describe()}).")
            keep.update(hits)
        node_of = lambda reader: reader.split("<")[0]  # noqa: E731  (a head's q, k, v inputs are its node)
        return np.array([self.senders[s] in keep and node_of(self.readers[r]) in keep for r, s in self.edges])
