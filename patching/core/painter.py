"""The sweep heatmap's drawing, by a helper process that imports matplotlib beside torch.

A run spends ~1 s importing torch on one core while the other idles, and importing matplotlib costs
~0.3 s more. So the executable (patching.main) forks a helper process (`start`) before it imports
torch (only the standard library is loaded then, and no thread runs); the helper imports matplotlib
meanwhile, then draws the heatmaps it is sent over a pipe (`paint`). Anything wrong with the helper
(it died, it failed to draw) and the heatmap is drawn in this process instead, so the helper can only
save time.

This module imports neither torch nor anything that does: the helper must stay light.
"""
from __future__ import annotations

import os
import pickle
import signal
import sys
import warnings

from patching.core.figures import figure

_helper = None  # (pid, write end, read end) of this process's helper, if it has one


def draw_heatmap(spec: dict, path: str):
    """matshow of spec["matrix"] (the patch analysis's heatmap_spec), diverging at zero, saved as a PNG,
    without matplotlib's "Glyph ... missing" warnings: tokens the font lacks (CJK, emoji, partial UTF-8)
    show as boxes; the token ids in results.json are exact."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*[Gg]lyph .* missing")
        _draw(spec, path)


def _draw(spec: dict, path: str):
    from matplotlib.colors import TwoSlopeNorm

    fig = figure(*spec["figsize"])
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
