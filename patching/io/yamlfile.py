"""YAML input, strictly: a safe loader that also refuses duplicate keys (YAML would keep the last
silently) and aliases (`*name`: a few hundred bytes of them expand to gigabytes), reading at most
1 MiB of UTF-8 (a byte-order mark is accepted). Every failure is one PatchingError line.

PyYAML is imported when a file is read: a single run never pays for it.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from mingpt.errors import quote
from patching.core.errors import PatchingError
from patching.core.serial import MAX_FILE_BYTES, read_text


@lru_cache(maxsize=1)
def strict_loader():
    """yaml.SafeLoader that refuses aliases and duplicate keys (made on first use)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a batch file; "
                                                  "write each value out", self.peek_event().start_mark)
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: SafeLoader says so itself below
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {quote(key, 40)}; YAML "
                                                            f"would keep only the last one", key_node.start_mark)
            return super().construct_mapping(node, deep)

    return StrictLoader


def read_yaml(path: Path, what: str = "batch file"):
    """At most 1 MiB of UTF-8 YAML through the strict loader; every failure is one PatchingError line."""
    import yaml
    text = read_text(path, what, MAX_FILE_BYTES)
    try:
        return yaml.load(text, Loader=strict_loader())  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = str(getattr(exc, "problem", None) or exc)[:160]
        raise PatchingError(f"{path} is not valid YAML{at} ({problem}): fix the file.") from None
    except RecursionError:
        raise PatchingError(f"{path} nests its values too deeply to be a batch file: fix the file.") from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a date like 2024-13-45
        raise PatchingError(f"{path} holds a value YAML cannot read ({exc.__class__.__name__}: "
                            f"{str(exc)[:80]}): quote it.") from None
