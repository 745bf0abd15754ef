"""The family registry: built-in families (every module of this package that defines a GANFamily subclass with
a ``name``) and families from other packages (entry points of the ``ganforge.families`` group,
``name = "package.module:Class"``). Adding a family is a module here, or an entry point in the user's own
package: nothing else in ganforge is edited."""

from __future__ import annotations

import importlib
import logging
import pkgutil
from functools import lru_cache
from typing import Any

from ganforge.models.family import GANFamily

log = logging.getLogger("ganforge.family")

ENTRY_POINT_GROUP = "ganforge.families"


def _scan_builtin() -> dict[str, type[GANFamily]]:
    found: dict[str, type[GANFamily]] = {}
    for mod in pkgutil.iter_modules(__path__, __name__ + "."):
        module = importlib.import_module(mod.name)
        for obj in vars(module).values():
            if (isinstance(obj, type) and issubclass(obj, GANFamily) and obj.name
                    and obj.__module__ == module.__name__):
                found[obj.name] = obj
    return found


def _scan_entry_points() -> dict[str, type[GANFamily]]:
    from importlib.metadata import entry_points

    found: dict[str, type[GANFamily]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found:
            continue  # the same distribution seen twice on sys.path (an editable install's egg-info)
        try:
            cls = ep.load()
        except Exception as e:  # a broken plugin must not take every other family down with it
            log.warning("family entry point %s = %s cannot be loaded: %s: %s", ep.name, ep.value, type(e).__name__, e)
            continue
        if not (isinstance(cls, type) and issubclass(cls, GANFamily)) or cls.name != ep.name:
            log.warning("family entry point %s = %s is not a GANFamily subclass named %r: ignored", ep.name, ep.value,
                        ep.name)
            continue
        found[ep.name] = cls
    return found


@lru_cache(maxsize=1)
def family_classes() -> dict[str, type[GANFamily]]:
    """Every family by name: built-ins first, then entry points (which may not replace a built-in)."""
    builtin = _scan_builtin()
    out = dict(builtin)
    for name, cls in _scan_entry_points().items():
        if name in builtin:
            log.warning("entry point family %r would replace the built-in one: ignored", name)
            continue
        out[name] = cls
    return dict(sorted(out.items()))


def family_class(name: str) -> type[GANFamily]:
    classes = family_classes()
    if name not in classes:
        raise ValueError(f"unknown family {name!r}; allowed: {', '.join(classes)}")
    return classes[name]


def get_family(train: Any) -> GANFamily:
    """The family instance for a validated ``train`` params section."""
    return family_class(train.family)(train)
