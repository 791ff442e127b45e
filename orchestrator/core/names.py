"""One rule for every name that becomes a run, a sweep, a sequence or a task, whatever its source
(``--name``, ``--resume``, a task or sequence file, a default the tool composes), checked before
anything starts (no Ray, no MLflow run, no folder).

A name becomes:

* a folder of the run storage, ``<storage>/<name>``: Ray Train's and Tune's ``RunConfig(name=...)``
  (Ray Train's controller *actor* creates it), ``orchestrator.runtime.session.StoreSession`` and
  ``--restart``'s delete. It must be exactly one path component, never ``.``/``..`` and never a
  ``/``: ``x/../b3-full`` resolved to another run's checkpoints and "resumed" from them. One
  component holds at most 255 bytes on ext4, XFS, btrfs, APFS and NTFS (``NAME_MAX``); a longer
  one failed inside Ray Train's controller actor, after Ray had started, as an ``ActorDiedError``
  (Ray itself puts no limit on actor names; the folder is what breaks).
* part of S3 keys (``<prefix>/<name>/trials/<trial>/checkpoint_000300/...``), which hold at most
  1,024 bytes: :func:`orchestrator.data.storage.run_dir` checks the whole prefix.
* an MLflow run name (the SQL store's ``runs.name`` column is ``VARCHAR(250)``:
  ``mlflow.store.tracking.dbmodels.models.SqlRun.name``) and the value of the ``orchestrate.name``
  tag that runs are found by, inside a filter string ``tags.`orchestrate.name` = '<name>'``, which
  a quote would break.
* a word of the shell commands the tool prints (resume hints), which a space or a quote would split.

Hence ASCII letters, digits, ``_``, ``.`` and ``-``, starting with a letter or a digit (never
``.``, ``..``, a hidden folder or something that reads as an option), and two lengths:

* :data:`NAME_MAX` (100 characters) for a name someone chooses: a flag, a task file's ``name``, a
  sequence's ``name`` and its tasks' names;
* :data:`DERIVED_MAX` (250 characters, MLflow's column, under the 255-byte file-name limit) for the
  names the tool composes from them: a default run name ``METHOD-TASK-HASH``, a sweep's
  ``sweep-METHOD-TASK-TIME``, a sequence task ``SEQUENCE-K-TASK``, a lifelong task run
  ``NAME-taskK-TASK``. Composed from names of at most 100 characters they stay under it.

:data:`RESERVED` are the storage's own top-level folders: a run of that name would share them.
"""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Iterable

from pydantic import AfterValidator

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
NAME_MAX = 100
DERIVED_MAX = 250
# orchestrator.data.artifacts keeps published artifacts in <storage>/artifacts and named refs in <storage>/named
RESERVED = frozenset({"artifacts", "named"})
RULE = "letters, digits, '_', '.' and '-', starting with a letter or a digit"

_OK = re.compile(NAME_PATTERN)


def _shown(name: str) -> str:
    """The name as a message shows it: quoted, and cut when it is long (a 300-character name
    would fill the line)."""
    return repr(name if len(name) <= 40 else name[:40] + "...")


def problem(name: object, limit: int = NAME_MAX) -> str | None:
    """Why ``name`` is not a valid name (one clause), or None when it is."""
    if not isinstance(name, str):
        return f"expected a name ({RULE}), got {type(name).__name__}"
    if not name:
        return f"empty; expected {RULE}"
    if len(name) > limit:
        return (f"{len(name)} characters, at most {limit} (a name is a folder of the run storage and an "
                "MLflow run name)")
    if not _OK.match(name):
        bad = sorted({c for c in name if not (c.isascii() and (c.isalnum() or c in "_.-"))})
        what = (f"{', '.join(repr(c) for c in bad)} not allowed" if bad
                else f"must start with a letter or a digit, not {name[0]!r}")
        return f"{what}; a name has {RULE} (it is one folder of the run storage)"
    if name in RESERVED:
        return f"reserved: the run storage keeps its own {name}/ folder"
    return None


def check_name(name: object, what: str, limit: int = NAME_MAX) -> str:
    """``name`` if it follows the rule, else ``ConfigError`` naming ``what`` (a flag, a file and
    key) and the reason, in one line."""
    why = problem(name, limit)
    if why is not None:
        from orchestrator.core.errors import ConfigError

        shown = _shown(name) if isinstance(name, str) else repr(name)
        raise ConfigError(f"{what} {shown}: {why}")
    return name  # type: ignore[return-value]


def _validator(limit: int):
    def validate(value: str) -> str:
        why = problem(value, limit)
        if why is not None:
            raise ValueError(why)
        return value

    return validate


#: a name someone chooses, as a pydantic field type (sequence files)
Name = Annotated[str, AfterValidator(_validator(NAME_MAX))]
#: a name that may be composed from others (a task of a sequence), as a pydantic field type
DerivedName = Annotated[str, AfterValidator(_validator(DERIVED_MAX))]


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``" (did you mean X?)"`` for the closest of ``choices`` (difflib), or ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""
