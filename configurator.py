"""
nanoGPT's "poor man's configurator", done properly. A script keeps its settings as plain globals and does:

    from configurator import configure, config_keys
    globals().update(configure(config_keys(globals()), sys.argv[1:]))

then runs e.g.
$ python train.py config/train_small.py --batch_size=32 --compile=False

Arguments apply left to right, later ones win:
- a bare path is a config file: plain Python run with the current settings already defined (so it can
  derive values, e.g. `lr_decay_iters = max_iters`); every public name it defines or changes is an override
  (prefix helpers with `_`; imports, functions and classes are ignored)
- --key=value is parsed as a Python literal, falling back to the raw string; --flag alone sets a bool to True
Every key must already exist and keep its default's type, so a typo or a wrong type fails at startup with
one line instead of silently training the wrong model. --help / -h lists all keys.
"""
import ast
import contextlib
import difflib
import os
import sys
import types

_TYPES = (int, float, bool, str, type(None))


class UserError(ValueError):
    """A mistake in what the user asked for: a setting, a path, a file, a checkpoint of another config. Every script
    prints its message as one line (it says what is wrong and what to do) instead of a traceback; any other
    exception is a bug and keeps its traceback."""


@contextlib.contextmanager
def one_line_errors(script):
    """Around a script's main (as a decorator or a `with`): a UserError ends the script with the one line
    '<script>: error: <message>' and exit status 1 (SystemExit with a string), not a traceback."""
    try:
        yield
    except UserError as e:
        raise SystemExit(f"{script}: error: {e}") from None


def check_choice(name, value, choices):
    """value, or a one-line UserError '<name> must be one of (...), not <value>'."""
    if value not in choices:
        raise UserError(f"{name} must be one of {tuple(choices)}, not {value!r}")
    return value


def config_keys(namespace):
    """The overridable settings of a module namespace: public lowercase names holding plain values (not imported
    constants such as EOS)."""
    return {k: v for k, v in namespace.items() if not k.startswith('_') and not k.isupper() and isinstance(v, _TYPES)}


def _fail(msg):
    # SystemExit with a string prints that one line and exits 1: no traceback for a user's typo
    raise SystemExit(f"config error: {msg}")


def _check_key(key, config):
    if key not in config:
        close = difflib.get_close_matches(key, list(config), n=1)
        _fail(f"unknown config key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))


def _check_type(key, value, default):
    if default is None:  # None means "no fixed type" (e.g. an optional path or seed)
        return value
    want = type(default)
    if want is float and type(value) is int:
        return float(value)
    # exact type match: bool is a subclass of int, but --compile=1 or --batch_size=True is a mistake
    if type(value) is not want:
        hint = " (write True/False)" if want is bool else ""
        _fail(f"config key {key!r} expects {want.__name__}, got {type(value).__name__} {value!r}{hint}")
    return value


def _parse(raw, default):
    if isinstance(default, str):  # keep --out_dir=123 a string
        return raw
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw  # e.g. --device=cuda:0 without quotes


def configure(defaults, argv=None, description="", quiet=False, skip_unknown_file_keys=False):
    """Return a new dict: `defaults` updated by the config files and --key=value arguments in `argv` (None:
    sys.argv[1:]). skip_unknown_file_keys: a config file may set keys this script does not have (bench.py reads the
    model settings of a training config and skips its training settings); --key=value stays strict."""
    argv = sys.argv[1:] if argv is None else argv
    if '--help' in argv or '-h' in argv:
        if description:
            print(description)
        print("settings (override with --key=value or a config file):")
        for k, v in defaults.items():
            print(f"  --{k}={v!r}  ({type(v).__name__})")
        raise SystemExit(0)
    config = dict(defaults)
    log = (lambda *a: None) if quiet else print
    for arg in argv:
        if not arg.startswith('-'):
            if not os.path.isfile(arg):
                _fail(f"config file not found: {arg}")
            log(f"Overriding config with {arg}")
            with open(arg) as f:
                source = f.read()
            ns = dict(config)
            exec(compile(source, arg, 'exec'), ns)  # compiled with its path so errors point into the file
            for k, v in ns.items():
                if k.startswith('_') or isinstance(v, types.ModuleType) or callable(v):
                    continue  # helpers: imports, functions, classes
                if (k in config and v is config[k]) or (skip_unknown_file_keys and k not in config):
                    continue  # untouched, or a key this script does not have and may skip
                _check_key(k, config)
                config[k] = _check_type(k, v, defaults[k])
                log(f"Overriding: {k} = {config[k]!r}")
        elif arg.startswith('--'):
            key, eq, raw = arg[2:].partition('=')  # first '=' only: values may contain '='
            _check_key(key, config)
            if eq:
                value = _parse(raw, defaults[key])
            elif isinstance(defaults[key], bool):
                value = True  # --compile is short for --compile=True
            else:
                _fail(f"config key {key!r} needs a value: --{key}=...")
            config[key] = _check_type(key, value, defaults[key])
            log(f"Overriding: {key} = {config[key]!r}")
        else:
            _fail(f"unrecognized argument {arg!r} (use --key=value or a config file path)")
    return config
