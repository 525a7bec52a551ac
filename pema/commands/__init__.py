"""The ``pema`` command: one subcommand per job (``pema run``, ``pema build``, ...), ``python -m pema`` alike.

The subcommands are data: :data:`COMMANDS` maps each name to the module that implements it and a one-line help.
Every such module has ``main(argv: list[str] | None) -> int`` (the exit code: 0, or 2 for bad input) and parses
its own options, so ``pema <name> --help`` is that job's help. Nothing is imported before a subcommand is chosen:
``pema --help`` is instant.

Adding a subcommand is one line here, ``"name": Command("pema.commands.name", "one-line help")``, and a module
``pema/commands/name.py`` with ``main(argv)``. Sub-subcommands are that module's own business: ``pema memory append
...`` calls :func:`pema.commands.memory.main` with ``["append", ...]``. A job's parser comes from
:func:`pema.jobs.cli.job_parser` with ``prog="pema <name>"``: ``--config``, ``section.key=value`` overrides and
``--output-dir`` then behave as in every other job.
"""
from __future__ import annotations

import importlib
import sys
from typing import NamedTuple


class Command(NamedTuple):
    module: str  # has main(argv: list[str] | None) -> int
    help: str  # one line, for ``pema --help``


COMMANDS: dict[str, Command] = {
    "run": Command("pema.commands.run", "every stage in turn: build the memories, train, decode and score "
                   "(the pipeline)"),
    "build": Command("pema.commands.build", "PLM owner: build the train and dev memories (Ray Data) and export the "
                     "output head"),
    "train": Command("pema.commands.train", "data owner: train the adapter on the memory, RCT then RCT_PD "
                     "(Ray Train)"),
    "evaluate": Command("pema.commands.evaluate", "decode the test pairs and score them with sacreBLEU (a Ray task)"),
    "compare": Command("pema.commands.compare", "every baseline and ablation on the same test pairs, with paired "
                       "bootstrap"),
    "tune": Command("pema.commands.tune", "Ray Tune: ASHA over training, a decoding sweep on dev, the winner "
                    "registered"),
    "register": Command("pema.commands.register", "register the adapter in MLflow; `champion` if better on dev "
                        "BLEU"),
    "serve-owner": Command("pema.commands.serve_owner", "the PLM owner's service on Ray Serve (keys, sessions, "
                           "the head)"),
    "serve-adapters": Command("pema.commands.serve_adapters", "the registered adapters on Ray Serve (text -> "
                              "text, per tenant)"),
    "memory": Command("pema.commands.memory", "the memory as a dataset: append pairs, delete pairs, list versions, "
                      "collect old ones"),
    "split-heldout": Command("pema.commands.split_heldout", "data: split one JSONL file into train, dev and test "
                             "after hygiene"),
    "parallel-to-jsonl": Command("pema.commands.parallel_to_jsonl", "data: two parallel text files -> the JSONL "
                                 "pairs the jobs read"),
}

USAGE = "usage: pema <command> [options]"


def overview() -> str:
    """``pema --help``: every subcommand with its one-line help."""
    width = max(map(len, COMMANDS)) + 2
    rows = [f"  {name:<{width}}{command.help}" for name, command in COMMANDS.items()]
    return "\n".join([USAGE, "", "PEMA's jobs, one subcommand each. `pema <command> --help` shows that command's "
                      "options;", "the jobs take --config FILE.yaml, section.key=value overrides and --output-dir DIR.",
                      "", "commands:", *rows])


def main(argv: list[str] | None = None) -> int:
    """Run the subcommand named by ``argv[0]`` with the rest; 2 with a named error for an unknown one."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print(overview(), file=sys.stderr)
        print("\nerror: no command given", file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help"):
        if argv[0] == "help" and len(argv) > 1:  # pema help train: pema train --help
            return main([argv[1], "--help"])
        print(overview())
        return 0
    name, rest = argv[0], argv[1:]
    command = COMMANDS.get(name)
    if command is None:
        print(f"{USAGE}\nerror: unknown command {name!r}; choose from {', '.join(COMMANDS)} (pema --help)",
              file=sys.stderr)
        return 2
    return importlib.import_module(command.module).main(rest)
