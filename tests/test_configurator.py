import pytest

from configurator import config_keys, configure

DEFAULTS = dict(learning_rate=6e-4, max_iters=1000, lr_decay_iters=1000, batch_size=12, compile=True,
                out_dir='out', start='\n', device='cuda', seed=None)
FILES = {  # config files the cases below name (a bare path: a config file, run with the current values defined)
    'a.py': 'batch_size = 8\nmax_iters = 50\n', 'b.py': 'batch_size = 16\n', 'lr2.py': 'learning_rate = 2\n',
    'big.py': 'max_iters = max_iters * 5\nlr_decay_iters = max_iters\nout_dir = out_dir + "-big"\n',
    'helpers.py': 'import math\nfrom math import sqrt\nfrom os import path as osp\ndef _f(x): return x\n'
                  'def scale(x): return 2 * x\nclass Foo: pass\n_n_gpus = 8\nbatch_size = scale(int(sqrt(16))) * _n_gpus\n',
    'typo.py': 'batch_sise = 8\n', 'yes.py': "compile = 'yes'\n"}


@pytest.fixture
def paths(tmp_path):
    """argv with every 'NAME.py' made a path in tmp_path, where FILES are written."""
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    return lambda argv: [str(tmp_path / a) if a.endswith('.py') else a for a in argv]


@pytest.mark.parametrize('argv, want', [
    ([], {}),
    (['--batch_size=32', '--learning_rate=1e-3', '--compile=False', '--device=cuda:1'],  # cuda:1: not a literal, so
     dict(batch_size=32, learning_rate=1e-3, compile=False, device='cuda:1')),          # the raw string
    (['--learning_rate=1'], dict(learning_rate=1.0)), (['lr2.py'], dict(learning_rate=2.0)),  # int taken as float
    (['--compile=False', '--compile'], dict(compile=True)),  # a bare bool flag means True
    (['--start=a=b', '--seed={"k": "x=y"}'], dict(start='a=b', seed={'k': 'x=y'})),  # values containing '='
    (['--out_dir=123', '--start=None'], dict(out_dir='123', start='None')),  # a str default keeps the raw string
    (['--seed=1337'], dict(seed=1337)), (['--seed=abc'], dict(seed='abc')), (['--seed=[1, 2]'], dict(seed=[1, 2])),
    (['a.py', '--max_iters=60', 'b.py'], dict(batch_size=16, max_iters=60)),  # files and flags: later ones win
    (['b.py', '--batch_size=4'], dict(batch_size=4)), (['--batch_size=4', 'b.py'], dict(batch_size=16)),
    (['--max_iters=200', 'big.py'], dict(max_iters=1000, lr_decay_iters=1000, out_dir='out-big')),  # computed
    (['helpers.py'], dict(batch_size=64)),  # imports, functions, classes and _private names are not keys
])
def test_overrides(argv, want, paths):
    config = configure(DEFAULTS, paths(argv), quiet=True)
    assert config == {**DEFAULTS, **want} and config is not DEFAULTS and DEFAULTS['batch_size'] == 12
    assert all(type(config[k]) is type(v) for k, v in want.items())


@pytest.mark.parametrize('argv, expected', [  # a full message, or parts of it
    (['--learnig_rate=1e-3'], "config error: unknown config key 'learnig_rate' (did you mean 'learning_rate'?)"),
    (['--zzzzzz=1'], "config error: unknown config key 'zzzzzz'"),
    (['typo.py'], "config error: unknown config key 'batch_sise' (did you mean 'batch_size'?)"),
    (['--batch_size=abc'], "config error: config key 'batch_size' expects int, got str 'abc'"),
    (['--max_iters=1.5'], ("expects int, got float 1.5",)),
    (['yes.py'], ("config key 'compile' expects bool, got str 'yes'",)),
    (['--compile=1'], ("expects bool, got int 1", "True/False")),
    (['--batch_size=True'], ("expects int, got bool True",)),
    (['--learning_rate=False'], ("expects float, got bool False",)),
    (['--batch_size'], ("needs a value",)),
    (['nope.py'], "config error: config file not found: {tmp}/nope.py"),
    (['-x'], ("unrecognized argument '-x'",)),
])
def test_errors_are_one_line(argv, expected, paths, tmp_path):
    with pytest.raises(SystemExit) as e:
        configure(DEFAULTS, paths(argv), quiet=True)
    msg = str(e.value)
    assert msg.startswith('config error: ') and '\n' not in msg
    if isinstance(expected, str):
        assert msg == expected.replace('{tmp}', str(tmp_path))
    else:
        assert all(part in msg for part in expected), msg


def test_override_messages_printed(paths, capsys):
    cfg, = paths(['b.py'])
    configure(DEFAULTS, [cfg, '--compile=False'])
    out = capsys.readouterr().out
    assert f"Overriding config with {cfg}" in out
    assert "Overriding: batch_size = 16" in out and "Overriding: compile = False" in out
    configure(DEFAULTS, [cfg], quiet=True)
    assert capsys.readouterr().out == ''


@pytest.mark.parametrize('flag', ['--help', '-h'])
def test_help_lists_keys_and_exits_0(flag, capsys):
    with pytest.raises(SystemExit) as excinfo:
        configure(DEFAULTS, ['--batch_size=3', flag, '--bogus=1'], description='train a tiny model')
    assert excinfo.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith('train a tiny model') and all(f"--{k}=" in out for k in DEFAULTS)
    assert "--batch_size=12  (int)" in out and "--out_dir='out'  (str)" in out and "--seed=None  (NoneType)" in out


def test_config_keys_selects_plain_public_globals():
    import math
    ns = dict(batch_size=12, lr=1e-3, compile=True, out_dir='out', seed=None, _private=1, math=math,
              f=lambda: 0, cls=int, lst=[1], __name__='__main__', EOS=50258)  # EOS: an imported constant
    assert config_keys(ns) == dict(batch_size=12, lr=1e-3, compile=True, out_dir='out', seed=None)
