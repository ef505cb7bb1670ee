"""The heatmap's drawing, and the `patch-run` executable's start: matplotlib imported beside torch.

A run spends ~1 s importing torch on one core while the other idles, and importing matplotlib costs
~0.3 s more. So the executable (`program`) forks a helper process before it imports torch (only the
standard library is loaded then, and no thread runs); the helper imports matplotlib meanwhile, then
draws the heatmaps it is sent over a pipe. Anything wrong with the helper (it died, it failed to
draw) and the heatmap is drawn in this process instead, so the helper can only save time.

This module imports neither torch nor anything that does: the helper must stay light.
"""
from __future__ import annotations

import os
import pickle
import signal
import sys
import warnings

_helper = None  # (pid, write end, read end) of this process's helper, if it has one


def draw_heatmap(spec: dict, path: str):
    """matshow of spec["matrix"] (from patching.report.heatmap_spec), diverging at zero, saved as a PNG,
    without matplotlib's "Glyph ... missing" warnings: tokens the font lacks (CJK, emoji, partial UTF-8)
    show as boxes; the token ids in results.json are exact."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*[Gg]lyph .* missing")
        _draw(spec, path)


def _draw(spec: dict, path: str):
    """A bare Figure on the Agg canvas: headless, without pyplot's import and figure manager."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    fig = Figure(figsize=spec["figsize"])
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lim = spec["lim"]
    im = ax.matshow(spec["matrix"], cmap="RdBu_r", norm=TwoSlopeNorm(vcenter=0.0, vmin=-lim, vmax=lim), aspect="auto")
    ticks, labels, rotation = spec["xticks"]
    if rotation:
        ax.set_xticks(ticks, labels, rotation=rotation)
    else:
        ax.set_xticks(ticks, labels)
    ax.set_xlabel(spec["xlabel"])
    ax.set_yticks(*spec["yticks"])
    for y in spec["rules"]:  # a thin rule between layers groups each layer's heads
        ax.axhline(y, color="black", linewidth=0.6)
    ax.xaxis.set_ticks_position("bottom")
    ax.set_ylabel(spec["ylabel"])
    ax.set_title(spec["title"], fontsize=10)
    fig.colorbar(im, ax=ax, label=spec["colorbar"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def paint(spec: dict, path):
    """Draw a heatmap: by the helper if there is one, else (or if it fails) here."""
    if _helper is not None:
        pid, w, r = _helper
        try:
            w.write(pickle.dumps((spec, str(path))))
            w.flush()
            if pickle.load(r) is None:  # drawn and saved
                return
        except (OSError, EOFError, pickle.PickleError):
            pass
        stop()  # it failed once: draw here from now on
    draw_heatmap(spec, str(path))


def start():
    """Fork the helper. Call before torch is imported: forking a process that runs threads is unsafe."""
    global _helper
    if _helper is not None or not hasattr(os, "fork") or "torch" in sys.modules:
        return
    from_parent, to_child = os.pipe()  # (read end, write end)
    from_child, to_parent = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(to_child)
        os.close(from_child)
        _serve(from_parent, to_parent)  # never returns
    os.close(from_parent)
    os.close(to_parent)
    _helper = (pid, os.fdopen(to_child, "wb"), os.fdopen(from_child, "rb"))


def stop():
    """Close the pipe (the helper exits on its end) and reap the helper."""
    global _helper
    if _helper is None:
        return
    pid, w, r = _helper
    _helper = None
    for f in (w, r):
        try:
            f.close()
        except OSError:
            pass
    try:
        os.waitpid(pid, 0)
    except (OSError, ChildProcessError):
        pass


def _serve(from_parent: int, to_parent: int):
    """The helper: import matplotlib, then draw each (spec, path) received until the pipe closes.
    Quiet (no output, Ctrl-C is the parent's to handle) and always exits through os._exit."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        try:
            import matplotlib.backends.backend_agg  # noqa: F401
            import matplotlib.colors  # noqa: F401
            import matplotlib.figure  # noqa: F401
        except Exception:  # the parent will find out when it asks, and draw (or fail) itself
            pass
        with os.fdopen(from_parent, "rb") as r, os.fdopen(to_parent, "wb") as w:
            while True:
                try:
                    spec, path = pickle.load(r)
                except EOFError:
                    break
                try:
                    draw_heatmap(spec, path)
                    reply = None
                except Exception as exc:  # the parent draws it again, and reports any error itself
                    reply = f"{type(exc).__name__}: {exc}"
                w.write(pickle.dumps(reply))
                w.flush()
    finally:
        os._exit(0)


def _draws_one_heatmap(argv: list[str]) -> bool:
    """Whether these arguments run the default command once (a helper would be wasted on --help,
    other commands, batches and dry runs; a wrong guess costs only the helper's idle import)."""
    if not argv or not (argv[0] == "patch" or argv[0].startswith("-")):
        return False
    return not any(a in ("-h", "--help") or a.startswith(("--batch", "--dry")) for a in argv)


def program() -> int:
    """The `patch-run` executable: start the helper when one heatmap will be drawn, then run the CLI."""
    if _draws_one_heatmap(sys.argv[1:]):
        start()
    try:
        from patching import cli
        return cli.program()
    finally:
        stop()
