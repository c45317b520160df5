"""`python tests/killed_run.py N <flg arguments>`: the `flg` command line, killed with SIGKILL right after it
logs training step N (as a crash or a pre-empted job would end it). For the kill -9 resume tests: it patches
the step log, so the stages themselves carry no test hook."""
import os
import signal
import sys

from flgcore import cli, train


def main() -> None:
    at, sys.argv = int(sys.argv[1]), [sys.argv[0], *sys.argv[2:]]
    log = train.append_jsonl

    def log_then_die(path, row):
        log(path, row)
        if row.get("step") == at:
            os.kill(os.getpid(), signal.SIGKILL)
    train.append_jsonl = log_then_die
    cli.entry()


if __name__ == "__main__":
    main()
