"""Activation patching as a Python API: settings in, numpy matrix and tables out.

    from patching.api import Settings, load, run
    model, tok = load(Settings(model="demo-names"))
    result = run(model, tok, clean="Michelle Jones was a top-notch student. Michelle",
                 corrupt="Michelle Smith was a top-notch student. Michelle", target="Jones", foil="Smith")
    result.matrix  # (n_layer, n_tokens) numpy: row l = patching the output of block l

Method: run the clean prompt and the corrupt prompt (same token count) once each, recording the
residual stream after every block; then, for every (layer, position), run the corrupt prompt with
that one vector replaced by the clean run's and measure the metric at the last position (default
logit(foil) - logit(target)). Where the clean run's information matters, the patch moves the metric
towards its clean value.
"""
from __future__ import annotations

import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch

from mingpt.bpe import BPETokenizer
from mingpt.errors import MinGPTError, quote
from mingpt.model import GPT, free_memory
from mingpt.sites import HEAD_SITES, SITES
from patching import attribution, engines
from patching.attribution import METHODS
from patching.engines import ENGINES, METRICS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("auto", "cpu", "cuda", "mps")
DIRECTIONS = {"denoise": "clean values patched into the corrupt run (is this activation sufficient?)",
              "noise": "corrupt values patched into the clean run (is this activation necessary?)"}
BOS = 50256  # <|endoftext|>, GPT-2's only special token
MAX_TOP_K = 1000  # rows of a next-token table: more would only bloat results.json and the page


class PatchingError(Exception):
    """A user mistake in what was asked of patch-run; the message is one sentence saying what to do."""


USER_ERRORS = (PatchingError, MinGPTError)  # what the CLI turns into one line


MAX_FILE_BYTES = 1 << 20  # an input file (batch, pairs, reference prompts) larger than this is a mistake (or /dev/zero)


def read_text(path, what: str, limit: int = MAX_FILE_BYTES) -> str:
    """A user's input file as text: at most `limit` bytes, UTF-8 with or without a byte-order mark
    (editors on Windows write one); every failure is one PatchingError line naming the file."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise PatchingError(f"cannot read {what} {path} ({exc.strerror or exc}).") from None
    if len(data) > limit:
        raise PatchingError(f"{what} {path} is larger than {limit >> 20} MiB: split it into smaller files.")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PatchingError(f"{what} {path} is not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start}): "
                            f"save it as UTF-8.") from None


def reject_unknown(data: dict, allowed, where: str, takes: str | None = None):
    """Unknown keys fail (YAML, JSONL, option mappings): name the first, then what is allowed."""
    unknown = [k for k in data if k not in allowed]
    if unknown:
        raise PatchingError(f"{where}: unknown key {quote(unknown[0], 40)}; "
                            f"{takes or 'allowed keys are ' + ', '.join(allowed)}.")


@dataclass(frozen=True)
class Settings:
    """How to run an experiment; every field can come from the CLI or a YAML batch's defaults/overrides.

    Frozen, so a checked Settings stays checked: derive changed copies with dataclasses.replace or merged()."""

    model: str = "gpt2"
    metric: str = "logit-diff"
    top_k: int = 20
    engine: str = "fast"
    device: str = "auto"
    dtype: str = "float32"
    max_rows: int = engines.MAX_ROWS  # fast engine: suffix rows per batched chunk (bounds memory)
    site: str = "resid_post"  # which activation is patched (mingpt.sites.SITES)
    direction: str = "denoise"  # denoise: clean values into the corrupt run; noise: corrupt into clean
    all_positions: bool = False  # head sites: patch a head at every position at once
    prepend_bos: bool = False  # put <|endoftext|> before both prompts (position 0), as TransformerLens does
    method: str = "exact"  # exact: the sweep; attribution: one backward's estimate (patching.attribution)
    qk_fix: bool = True  # attribution at q/k: the pattern exactly, linear from there (AtP*)
    check: bool = False  # attribution: also run the exact sweep and report the estimate's errors

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Raise PatchingError (one line) unless every field has a usable type and value."""
        choices = {"metric": METRICS, "engine": ENGINES, "device": DEVICES, "dtype": DTYPES, "site": SITES,
                   "direction": DIRECTIONS, "method": METHODS}
        for name, allowed in choices.items():
            value = getattr(self, name)
            if not isinstance(value, str) or value not in allowed:
                raise PatchingError(f"{name} {quote(value)} is not one of {', '.join(allowed)}.")
        for name in ("top_k", "max_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PatchingError(f"{name} must be a positive integer, got {quote(value)}.")
        if self.top_k > MAX_TOP_K:  # every table is written into results.json and report.html
            raise PatchingError(f"top_k is at most {MAX_TOP_K} (the rows of the next-token tables), got {self.top_k}.")
        if not isinstance(self.model, str) or not self.model.strip():
            raise PatchingError(f"model must be a name or folder, got {quote(self.model)}.")
        for name in ("all_positions", "prepend_bos", "qk_fix", "check"):
            if not isinstance(getattr(self, name), bool):
                raise PatchingError(f"{name} must be true or false, got {quote(getattr(self, name))}.")
        if self.all_positions and self.site not in HEAD_SITES:
            raise PatchingError(f"all_positions patches a head at every position: it needs a head site "
                                f"({', '.join(HEAD_SITES)}), not {self.site}.")
        if self.check and self.method != "attribution":
            raise PatchingError("check compares attribution patching with the exact sweep: add --method attribution "
                                "(the exact method needs no check).")

    @classmethod
    def from_dict(cls, data: dict, where: str) -> "Settings":
        """Build from a YAML mapping, failing loudly on keys we do not know."""
        if not isinstance(data, dict):
            raise PatchingError(f"{where} must be a mapping of settings, got {quote(data)}.")
        reject_unknown(data, [f.name for f in fields(cls)], where)
        try:
            return cls(**data)
        except PatchingError as exc:
            raise PatchingError(f"{where}: {exc}") from None

    def merged(self, overrides: dict, where: str) -> "Settings":
        return Settings.from_dict({**asdict(self), **overrides}, where)


@dataclass
class TopEntry:
    rank: int
    token_id: int
    token: str
    prob: float
    logit: float


@dataclass
class RunSummary:
    """The unpatched run's last position: its top-k table and the target's and foil's standing."""

    topk: list[TopEntry]
    target_logit: float
    target_prob: float
    foil_logit: float
    foil_prob: float
    value: float  # the metric without any patch


@dataclass
class Prepared:
    """Both prompts tokenized and checked, ready to run."""

    clean_ids: list[int]
    corrupt_ids: list[int]
    tokens: list[str]
    corrupt_tokens: list[str]
    target: str
    target_id: int
    foil: str
    foil_id: int

    @property
    def differing(self) -> list[int]:
        return [i for i, (a, b) in enumerate(zip(self.clean_ids, self.corrupt_ids)) if a != b]


@dataclass
class PatchResult:
    """Everything one experiment produced. `matrix` is numpy with axes `axes`: (layer, position) for
    residual sites (row l of resid_post = block l's output), (layer, head, position) for head sites,
    (layer, head) with all_positions."""

    prepared: Prepared
    settings: Settings
    model: str
    n_layers: int
    matrix: np.ndarray
    clean: RunSummary
    corrupt: RunSummary
    timing: dict
    versions: dict = field(default_factory=dict)
    exact_matrix: np.ndarray | None = None  # --check: the exact sweep beside the attribution estimate
    check: dict | None = None  # --check: patching.attribution.compare's report

    @property
    def axes(self) -> list[str]:
        return axes_of(self.settings.site, self.settings.all_positions)

    def to_json(self) -> dict:
        """The results.json document (schema in README)."""
        p = self.prepared
        return {
            "model": self.model, "metric": self.settings.metric, "metric_definition": METRICS[self.settings.metric],
            "engine": self.settings.engine, "device": self.timing.get("device"), "dtype": self.settings.dtype,
            "site": self.settings.site, "direction": self.settings.direction,
            "direction_definition": DIRECTIONS[self.settings.direction], "axes": self.axes,
            "all_positions": self.settings.all_positions, "prepend_bos": self.settings.prepend_bos,
            "tokens": p.tokens, "corrupt_tokens": p.corrupt_tokens, "clean_ids": p.clean_ids,
            "corrupt_ids": p.corrupt_ids, "differing_positions": p.differing,
            "target": {"text": p.target, "id": p.target_id}, "foil": {"text": p.foil, "id": p.foil_id},
            "n_layers": self.n_layers, "n_tokens": len(p.tokens),
            "matrix": json_floats(self.matrix),
            "clean_value": json_floats(self.clean.value), "corrupt_value": json_floats(self.corrupt.value),
            "runs": {name: {k: json_floats(v) for k, v in asdict(run).items() if k != "topk"}
                     for name, run in (("clean", self.clean), ("corrupt", self.corrupt))},
            "topk": {"clean": [asdict(e) for e in self.clean.topk], "corrupt": [asdict(e) for e in self.corrupt.topk]},
            "timing": self.timing, "versions": self.versions, "method": self.settings.method,
            **({"qk_fix": self.settings.qk_fix} if self.settings.method == "attribution" else {}),
            **({"check": self.check, "exact_matrix": json_floats(self.exact_matrix)} if self.check else {}),
        }


def json_floats(x):
    """x (a float, nested lists or tuples, or a numpy array) with non-finite floats as None: JSON has no NaN."""
    if isinstance(x, np.ndarray):
        x = x.tolist()
    if isinstance(x, (list, tuple)):
        return [json_floats(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    return x


def axes_of(site: str, all_positions: bool) -> list[str]:
    return ["layer"] + (["head"] if site in HEAD_SITES else []) + ([] if all_positions else ["position"])


def finite(values: torch.Tensor, what: str, model: GPT | None = None):
    """A damaged checkpoint (a NaN weight, a negative layer_norm_epsilon) makes every number NaN: say so,
    naming the damaged tensor when there is one."""
    if not bool(torch.isfinite(values).all()):
        bad = model.damaged() if model is not None and hasattr(model, "damaged") else None
        why = f"tensor {quote(bad, 60)} holds NaN or infinite values" if bad else \
            "the model's weights or config are damaged"
        raise PatchingError(f"{what} are not finite (NaN or infinity): {why}; re-download or re-save the checkpoint.")


def indistinct(r_clean: torch.Tensor, r_corrupt: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the clean and corrupt logit differences are equal up to rounding of logits this size.
    Logits carry rounding errors accumulated over every block (float32 kernels differ by ~1e-6 on
    GPT-2's logits), so a gap below 1e-4 of the largest logit (8 ulps in half precision) is noise,
    and dividing by it gives meaningless recoveries like 2.0 or -1.0."""
    scale = float(torch.stack([r_clean[:2], r_corrupt[:2]]).abs().max())
    gap = abs(float((r_clean[1] - r_clean[0]) - (r_corrupt[1] - r_corrupt[0])))
    return gap <= max(1e-4, 8 * torch.finfo(dtype).eps) * max(scale, 1e-30)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    try:
        ours = version("patch-run")
    except PackageNotFoundError:
        ours = "unknown"
    return {"patch-run": ours, "torch": torch.__version__, "numpy": np.__version__,
            "python": sys.version.split()[0], "platform": platform.platform()}


# ----------------------------------------------------------------------------- loading


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PatchingError("--device cuda was asked for but no CUDA GPU is visible to torch: use --device cpu.")
    if name == "mps" and not torch.backends.mps.is_available():
        raise PatchingError("--device mps was asked for but MPS is not available here: use --device cpu.")
    return torch.device(name)


def load(settings: Settings) -> tuple[GPT, BPETokenizer]:
    """Load the model (weights + vocabulary) once, on the requested device and dtype."""
    device = resolve_device(settings.device)
    if settings.dtype != "float32" and device.type == "cpu":
        raise PatchingError(f"--dtype {settings.dtype} is for GPUs; on the CPU use float32.")
    model = GPT.from_pretrained(settings.model)
    tok = BPETokenizer(settings.model)
    return model.to(device=device, dtype=DTYPES[settings.dtype]), tok


# ----------------------------------------------------------------------------- one experiment


def available_memory(device: torch.device) -> int | None:
    """Bytes free for a sweep on this device, or None where we cannot tell."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return free_memory()


def check_memory(plan: engines.Plan, device: torch.device):
    """Refuse, before recording anything, a sweep (or attribution estimate) whose estimate exceeds the
    free memory."""
    free = available_memory(device)
    if free is not None and plan.peak_bytes > free:
        chunked = plan.site != "pattern" and plan.method == "exact"  # --max-rows bounds its chunks
        fix = "lower --max-rows, shorten the prompt or use a smaller model" if chunked else \
            "shorten the prompt or use a smaller model"
        size = lambda n: f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"  # noqa: E731
        what = "sweep" if plan.method == "exact" else "attribution estimate"
        raise PatchingError(f"this {plan.site} {what} needs about {size(plan.peak_bytes)} but {device.type} has "
                            f"{size(free)} free: {fix}.")


def check_text(text, what: str) -> str:
    """A prompt or word must be a str that UTF-8 can encode (a Latin-1 terminal's bytes arrive as lone
    surrogates, which cannot be tokenized)."""
    if not isinstance(text, str):
        raise PatchingError(f"the {what} must be text (a str), got {type(text).__name__} {quote(text)}.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PatchingError(f"the {what} holds bytes that are not UTF-8 (at character {exc.start}, "
                            f"{quote(text[max(0, exc.start - 10):exc.start + 10])}): set your terminal or file to "
                            f"UTF-8 and type it again.") from None
    return text


def single_token(tok: BPETokenizer, word: str, role: str) -> tuple[str, int]:
    """A target/foil word follows the prompt, so it is looked up with a leading space (' Jones');
    a word written '=TEXT' is taken exactly as TEXT, with no space added ('=.' is the token '.')."""
    check_text(word, role)
    exact = word.startswith("=")
    text = word[1:] if exact else word if word.startswith(" ") else " " + word
    if not word.strip() or not text:
        raise PatchingError(f"the {role} is empty: give the word the model should predict next, e.g. Jones "
                            f"(or =TEXT for a token without the leading space).")
    ids = tok.encode(text)
    if len(ids) != 1:
        pieces = " + ".join(quote(tok.token_str(i), 20) for i in ids[:6]) + (" + ..." if len(ids) > 6 else "")
        raise PatchingError(f"the {role} {quote(text)} is {len(ids)} tokens ({pieces}), not one: pick a word that is a "
                            f"single GPT-2 token, e.g. its first piece {tok.token_str(ids[0])!r}.")
    return text, ids[0]


def prepare(tok: BPETokenizer, clean: str, corrupt: str, target: str, foil: str, block_size: int,
            vocab_size: int | None = None, prepend_bos: bool = False) -> Prepared:
    """Tokenize and check both prompts and both answer words; raise PatchingError on any misfit.
    With vocab_size, every id must be one the model has (a damaged vocabulary can map outside it)."""
    for role, text in (("clean", clean), ("corrupt", corrupt)):
        check_text(text, f"{role} prompt")
        if not text.strip():
            raise PatchingError(f"the {role} prompt is empty: give the text whose next token is predicted.")
    bos = [BOS] if prepend_bos else []  # labelled position 0 in every table and figure
    a, b = bos + tok.encode(clean), bos + tok.encode(corrupt)
    show = lambda ids: "|".join(tok.token_str(i) for i in ids)  # noqa: E731
    if len(a) != len(b):
        raise PatchingError(f"the clean prompt is {len(a)} tokens [{show(a)}] but the corrupt prompt is {len(b)} "
                            f"[{show(b)}]: edit them until both have the same number of tokens.")
    if len(a) > block_size:
        raise PatchingError(f"the prompts are {len(a)} tokens but the model's context holds {block_size}: shorten them.")
    if a == b:
        raise PatchingError("the clean and corrupt prompts are the same tokens, so there is nothing to patch: "
                            "change the corrupt prompt where the clean one carries the information.")
    t_text, t_id = single_token(tok, target, "target")
    f_text, f_id = single_token(tok, foil, "foil")
    if t_id == f_id:
        raise PatchingError(f"target and foil are the same token {t_text!r}: the metric compares two different tokens.")
    if vocab_size is not None:
        for what, i in (("target", t_id), ("foil", f_id), *(("prompt token", i) for i in a + b)):
            if not 0 <= i < vocab_size:
                raise PatchingError(f"the vocabulary maps the {what} to id {i}, outside the model's 0..{vocab_size - 1}: "
                                    f"use the vocabulary files that belong to this model.")
    return Prepared(a, b, [tok.token_str(i) for i in a], [tok.token_str(i) for i in b], t_text, t_id, f_text, f_id)


def summarize(logits: torch.Tensor, tok: BPETokenizer, prep: Prepared, k: int, value: float) -> RunSummary:
    """Top-k table and target/foil standing from one run's last-position logits (vocab,)."""
    logits = logits.float().cpu()
    probs = torch.softmax(logits, dim=-1)
    top = torch.topk(probs, min(k, probs.numel()))
    table = [TopEntry(r + 1, int(i), tok.token_str(int(i)), float(pv), float(logits[i]))
             for r, (pv, i) in enumerate(zip(top.values, top.indices))]
    return RunSummary(table, float(logits[prep.target_id]), float(probs[prep.target_id]),
                      float(logits[prep.foil_id]), float(probs[prep.foil_id]), value)


def run(model: GPT, tok: BPETokenizer, clean: str, corrupt: str, target: str, foil: str,
        settings: Settings | None = None, progress: engines.Progress | None = None, plan=None) -> PatchResult:
    """The whole experiment: tokenize, record both runs, sweep every cell of the site, summarize.

    plan: called with the sweep's engines.Plan before it runs (it may raise to stop there)."""
    settings = settings if settings is not None else Settings(model=getattr(model, "name", "random"))
    if not isinstance(settings, Settings):
        raise PatchingError(f"settings must be a patching.api.Settings, got {type(settings).__name__}: "
                            f"pass Settings(**your_dict).")
    settings.validate()  # also catches fields changed behind the frozen dataclass's back
    if not hasattr(model, "config") or not callable(getattr(tok, "encode", None)):
        raise PatchingError("run() needs the model and tokenizer that load() returns: model, tok = load(settings).")
    prep = prepare(tok, clean, corrupt, target, foil, model.config.block_size, model.config.vocab_size,
                   settings.prepend_bos)
    device = next(model.parameters()).device
    clean_ids = torch.tensor([prep.clean_ids], device=device)
    corrupt_ids = torch.tensor([prep.corrupt_ids], device=device)
    lse = engines.needs_lse(settings.metric)
    site = settings.site

    t0 = time.perf_counter()
    # memory first, before the recordings (a pattern recording alone can be the largest thing), with
    # every cell counted; the plan shown is made again below, when the no-op cells are known
    def planned(noop):  # the exact sweep's plan, or an attribution estimate's
        args = (model.config, len(prep.clean_ids), site, settings.all_positions, settings.max_rows, lse, noop)
        return attribution.plan(*args, settings.qk_fix, settings.check) if settings.method == "attribution" \
            else engines.plan(*args)

    check_memory(planned(None), device)
    sites = [site] + (attribution.needed_sites(site, settings.qk_fix) if settings.method == "attribution" else [])
    rec_clean, rec_corrupt = engines.record(model, clean_ids, sites), engines.record(model, corrupt_ids, sites)
    for name, rec in (("clean", rec_clean), ("corrupt", rec_corrupt)):
        finite(rec.last_logits, f"the {name} run's logits", model)
    r_clean = engines.readout(rec_clean.last_logits[0], prep.target_id, prep.foil_id, True).cpu()
    r_corrupt = engines.readout(rec_corrupt.last_logits[0], prep.target_id, prep.foil_id, True).cpu()
    denoise = settings.direction == "denoise"
    (base_ids, base, r_base), (src, r_src) = ((corrupt_ids, rec_corrupt, r_corrupt), (rec_clean, r_clean)) if denoise \
        else ((clean_ids, rec_clean, r_clean), (rec_corrupt, r_corrupt))
    if settings.metric == "recovery" and indistinct(r_clean, r_corrupt, rec_clean.last_logits.dtype):
        d_clean, d_corrupt = float(r_clean[1] - r_clean[0]), float(r_corrupt[1] - r_corrupt[0])
        raise PatchingError(f"recovery is undefined here: the clean and corrupt runs give the same logit difference "
                            f"up to float rounding ({d_clean:.6g} vs {d_corrupt:.6g}); use --metric logit-diff.")
    source = src[site][:, 0]
    the_plan = planned(engines.noop_cells(base, source, site, settings.all_positions))
    if plan:
        plan(the_plan)
    # recovery: 0 = the patched run's own value, 1 = the other run's, in either direction
    value = lambda r: float(engines.metric_values(settings.metric, r, r_src, r_base))  # noqa: E731
    t1 = time.perf_counter()
    if settings.method == "attribution":  # one backward's estimate, as metric values
        matrix = value(r_base) + attribution.estimate(model, base_ids, base, source, site, settings.metric,
                                                      prep.target_id, prep.foil_id, r_src, r_base,
                                                      settings.all_positions, settings.qk_fix).numpy()
        finite(torch.from_numpy(matrix), "the attribution estimates")
    t2 = time.perf_counter()
    if settings.method == "exact" or settings.check:
        readouts = engines.sweep(model, base_ids, base, source, site, prep.target_id, prep.foil_id, lse,
                                 settings.all_positions, settings.engine, settings.max_rows, progress)
        if device.type == "cuda":
            torch.cuda.synchronize()
        exact = engines.metric_values(settings.metric, readouts, r_src, r_base).numpy().astype(np.float64)
        finite(torch.from_numpy(exact), "the patched runs' values")
    t3 = time.perf_counter()
    timing = {"sweep_seconds": round(t2 - t1 if settings.method == "attribution" else t3 - t2, 6)}
    check = None
    if settings.method == "exact":
        matrix = exact
    elif settings.check:
        live = ~engines.noop_cells(base, source, site, settings.all_positions).numpy().reshape(matrix.shape)
        check = attribution.compare(exact, matrix, value(r_base), live, axes_of(site, settings.all_positions),
                                    prep.tokens, source_value=value(r_src))
        timing["exact_sweep_seconds"] = round(t3 - t2, 6)
    return PatchResult(
        prepared=prep, settings=settings, model=getattr(model, "name", settings.model),
        n_layers=model.config.n_layer, matrix=matrix,
        clean=summarize(rec_clean.last_logits[0], tok, prep, settings.top_k, value(r_clean)),
        corrupt=summarize(rec_corrupt.last_logits[0], tok, prep, settings.top_k, value(r_corrupt)),
        timing={"record_seconds": round(t1 - t0, 6), **timing,
                "patches": int(np.prod(matrix.shape)), "device": str(device)},
        versions=versions(), exact_matrix=exact if check else None, check=check,
    )
