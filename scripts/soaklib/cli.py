"""scripts/soak [--seed N] [--minutes M | --seconds S] [--steps K] [--size MIB] [--keep]"""

import argparse
import random

from .runner import run


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="scripts/soak",
        description="A seeded chaos soak of one served disk (docs/soak.md).")
    parser.add_argument("--seed", type=int, default=None,
                        help="the schedule's seed (default: random, printed)")
    parser.add_argument("--minutes", type=float, default=None)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--steps", type=int, default=None,
                        help="stop after this many steps (replay up to a failing one)")
    parser.add_argument("--size", type=int, default=32, help="disk size in MiB (default 32)")
    parser.add_argument("--workdir", default=None,
                        help="folder for images, state and logs (default: a new one in /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir after a pass")
    parser.add_argument("--exclude", action="append", default=[], metavar="OP",
                        help="leave an operation out of the schedule (repeatable)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1, 1 << 31)
    if args.seconds is not None:
        seconds = args.seconds
    elif args.minutes is not None:
        seconds = args.minutes * 60
    else:
        seconds = 60 if args.steps is None else 1e9
    return run(seed, seconds, workdir=args.workdir, size=args.size << 20,
               max_steps=args.steps, keep=args.keep, exclude=set(args.exclude))
