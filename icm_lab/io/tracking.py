"""Experiment tracking. Results are always written to disk first; a tracker mirrors them.

Built from `conf/logger/*.yaml` through `_target_` (a partial: the run adds its directory,
config, name and group). `logger=none` tracks nothing. `logger=wandb` logs to Weights & Biases,
one run per job, grouped by sweep in a multirun.

W&B never ends a run. Before an online run the server is asked to check the key, within
`PROBE_TIMEOUT_S`; with no key, a bad key, no network or a server that does not answer, the run
warns once and logs offline (`wandb sync` uploads it later). A tracker call that fails during
the run (the W&B service died, say) warns once and mirroring stops; results stay on disk.
"""

from __future__ import annotations

import logging
import netrc
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pandas as pd

log = logging.getLogger(__name__)

# wandb.Api's credential check: a closed port or a malformed key fails at once, a silent server
# at this bound. A server that passes it and then stalls is bounded by `init_timeout`.
PROBE_TIMEOUT_S = 5
LOCAL_MODES = ("offline", "dryrun", "disabled")


class Tracker:
    """The no-op tracker (`logger=none`)."""

    def __init__(self, run_dir: Path, config: dict, name: str, group: str | None = None):
        pass

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        pass

    def log_images(self, images: dict[str, Path]) -> None:
        pass

    def log_table(self, key: str, table: pd.DataFrame) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbTracker(Tracker):
    """A W&B run: online when the server accepts the key, else offline; no call raises."""

    def __init__(self, run_dir: Path, config: dict, name: str, group: str | None = None,
                 project: str = "icm_lab", entity: str | None = None, mode: str | None = None,
                 init_timeout: float = 10.0):
        self.wandb = _wandb()
        self.run_dir = run_dir
        self.failed = False  # a call failed: warned once, mirroring stopped
        init = dict(project=project, entity=entity, group=group, name=name, dir=str(run_dir),
                    reinit="finish_previous", config=config)
        self.run = self._start(mode or os.environ.get("WANDB_MODE"), init_timeout, init)

    def _start(self, mode: str | None, init_timeout: float, init: dict[str, Any]) -> Any:
        """An online run if W&B answers, else an offline one (one warning), else None."""
        if mode in LOCAL_MODES:
            return self._init_or_none(mode=mode, **init)
        problem = _online_problem()
        if problem is None:
            try:  # the probe passed, but the server may still refuse or stall
                return _wandb().init(mode=mode, **init,
                                      settings=_wandb().Settings(init_timeout=init_timeout))
            except Exception as error:  # CommError, AuthenticationError, UsageError, ...
                problem = _one_line(error)
        run = self._init_or_none(mode="offline", **init)
        if run is not None:
            log.warning("W&B: cannot log online (%s); logging offline instead (upload later "
                        "with `wandb sync %s`)", problem, Path(run.dir).parent)
        return run

    def _init_or_none(self, **init: Any) -> Any:
        try:
            return _wandb().init(**init)
        except Exception as error:
            log.warning("W&B: cannot start a run (%s); this run is not tracked, its results are "
                        "on disk in %s", _one_line(error), self.run_dir)
            _reset_wandb()
            return None

    def _mirror(self, what: str, call: Callable[[], Any], after_failure: bool = False) -> None:
        """Run a W&B call; the first failure warns and stops mirroring; none raises."""
        if self.run is None or (self.failed and not after_failure):
            return
        try:
            call()
        except Exception as error:
            if not self.failed:
                log.warning("W&B: %s failed (%s); no more is logged to W&B, the results are on "
                            "disk in %s", what, _one_line(error), self.run_dir)
            self.failed = True

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        self._mirror("logging metrics", lambda: self.run.log(metrics))

    def log_images(self, images: dict[str, Path]) -> None:
        self._mirror("logging images", lambda: self.run.log(
            {key: self.wandb.Image(str(path)) for key, path in images.items()}))

    def log_table(self, key: str, table: pd.DataFrame) -> None:
        self._mirror("logging a table", lambda: self.run.log(
            {key: self.wandb.Table(dataframe=table.reset_index(drop=True))}))

    def finish(self, exit_code: int = 0) -> None:
        # tried even after a failed call: if W&B still works, its run records the exit code
        self._mirror("finishing the run", lambda: self.run.finish(exit_code=exit_code),
                     after_failure=True)
        if self.failed:
            _reset_wandb()


def _wandb() -> Any:
    """The wandb module, imported by the W&B tracker alone: `logger=none` runs never pay its
    start-up, nor need it installed (a bare GPU host, the rehearsal kit)."""
    import wandb

    return wandb


def _online_problem() -> str | None:
    """Why W&B cannot log online now (no key, bad key, no answer), or None."""
    if not _has_wandb_key():
        return "no API key found"  # and no prompt for one: runs are often unattended
    try:  # recent wandb checks the key in the constructor, older ones on the first query
        _wandb().Api(timeout=PROBE_TIMEOUT_S).viewer  # noqa: B018
    except Exception as error:
        return _one_line(error)
    return None


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or _wandb().Settings().base_url).hostname
    try:  # `wandb login` stores the key in ~/.netrc under the server's host
        found = netrc.netrc(os.environ.get("NETRC")).authenticators(host or "")
    except (OSError, netrc.NetrcParseError):
        return False
    return found is not None


def _reset_wandb() -> None:
    """Drop wandb's process state (a dead service connection), so that the next run in this
    process (a job of a multirun) starts afresh."""
    try:
        _wandb().teardown()
    except Exception as error:  # teardown reports the dead connection, then resets anyway
        log.debug("W&B: teardown: %s", _one_line(error))


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0][:200].rstrip(".") if text else "") or type(error).__name__
