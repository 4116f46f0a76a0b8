"""`sft` in a real process, for tests that signal or kill a run: ``python sft_process.py run ARGS``.

Built-in plugins only, plus a test plugin steered by environment variables:

* ``SFT_TEST_STEP_SECONDS``: sleep this long after every optimizer step, so a test polling
  from outside can reliably catch the run between two checkpoints;
* ``SFT_TEST_DIE_SAVING``: the process SIGKILLs itself while writing ``checkpoint-N`` for this
  N, after the weights, optimizer and RNG state and half of trainer_state.json are on disk.
"""

from __future__ import annotations

import functools
import os
import signal
import time

from sftcore import hookimpl


class Steering:
    @hookimpl
    def trainer_callbacks(self, config):
        from transformers import TrainerCallback

        seconds = float(os.environ.get("SFT_TEST_STEP_SECONDS", "0"))

        class Sleep(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                time.sleep(seconds)

        return [Sleep()]


def die_while_saving(step: int) -> None:
    from transformers.trainer_callback import TrainerState

    original = TrainerState.save_to_json

    def save_to_json(self, json_path):
        original(self, json_path)
        if os.path.basename(os.path.dirname(json_path)) == f"checkpoint-{step}":
            with open(json_path, "r+") as handle:
                handle.truncate(len(handle.read()) // 2)
            os.kill(os.getpid(), signal.SIGKILL)

    TrainerState.save_to_json = save_to_json


def main() -> None:
    from sftcore.cli import main as sft_main
    from sftcore.commands import common
    from sftcore.host import load_host

    if os.environ.get("SFT_TEST_DIE_SAVING"):
        die_while_saving(int(os.environ["SFT_TEST_DIE_SAVING"]))
    common.load_host = functools.partial(load_host, entry_points=False, extra={"steering": Steering()})
    sft_main()


if __name__ == "__main__":
    main()
