"""`gfdm-fast` command line: one sub-command per module, imported on demand.

Each sub-command module defines ``add_arguments(parser)`` and ``run(args)``.
Errors a user can cause (``UserError``, ``ValueError``, missing files) end in
one line on stderr and exit status 2, never a traceback.
"""
import argparse
import errno
import importlib
import os
import sys

from gfdm_fast.errors import UserError

# name -> (module, one-line help)
COMMANDS = {
    "demo":     ("gfdm_fast.cli.demo",     "train a small model on built-in digits and sample a grid"),
    "train":    ("gfdm_fast.cli.train",    "train a GFDM model (official train.py flags)"),
    "generate": ("gfdm_fast.cli.generate", "sample from a checkpoint (official generate.py flags)"),
    "fid":      ("gfdm_fast.cli.fid",      "FID (and pixel Vendi score) between two image sets"),
    "bench":    ("gfdm_fast.cli.bench",    "quick throughput benchmark"),
}


def _available():
    found = {}
    for name, (module, help_) in COMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            found[name] = (module, help_)
    return found


def build_parser(commands=None):
    """The gfdm-fast parser; ``commands`` (a dict) receives each command's own parser."""
    parser = argparse.ArgumentParser(prog="gfdm-fast", description="Fast Generative Fractional Diffusion Models")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in _available().items():
        p = sub.add_parser(name, help=help_, description=help_)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
        if commands is not None:
            commands[name] = p
    return parser


_UNSET = object()


def given_options(command_parser, args, argv):
    """The dests of the options the user gave, as argparse matched them (abbreviations, --flag=value):
    the command's arguments are parsed again into a namespace whose every field is a sentinel, and
    argparse leaves a field alone unless its option was given."""
    rest = argv[argv.index(args.command) + 1:]
    probe = argparse.Namespace(**{k: _UNSET for k in vars(args)})
    command_parser.parse_args(rest, namespace=probe)
    return tuple(k for k, v in vars(probe).items() if v is not _UNSET and k != "_module")


def main(argv=None):
    commands = {}
    parser = build_parser(commands)
    argv = list(sys.argv[1:] if argv is None else map(str, argv))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    args.given = given_options(commands[args.command], args, argv)      # which options the user gave
    try:
        result = importlib.import_module(args._module).run(args)
    except (UserError, ValueError, FileNotFoundError) as err:
        print(f"gfdm-fast {args.command}: error: {err}", file=sys.stderr)
        return 2
    except PermissionError as err:          # a read-only output folder, an input owned by someone else
        where = err.filename or "a file"
        print(f"gfdm-fast {args.command}: error: cannot access {where}: permission denied; choose a folder "
              "you can write to (or fix the permissions)", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in (errno.EROFS, errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"gfdm-fast {args.command}: error: cannot write {err.filename or 'the output'}: "
              f"{os.strerror(err.errno)}; choose another output folder", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gfdm-fast {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0 if result is None else int(result)


def parse_bool(value):
    """argparse type for the official ``True/False`` boolean flags."""
    v = str(value).strip().lower()
    if v in ("true", "1", "yes", "y"):
        return True
    if v in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


if __name__ == "__main__":
    sys.exit(main())
