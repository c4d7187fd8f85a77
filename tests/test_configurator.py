import pytest

from configurator import config_keys, configure

DEFAULTS = dict(learning_rate=6e-4, max_iters=1000, lr_decay_iters=1000, batch_size=12, compile=True,
                out_dir='out', start='\n', device='cuda', seed=None)


def run(argv, defaults=DEFAULTS):
    return configure(defaults, argv, quiet=True)


def error(argv, defaults=DEFAULTS):
    with pytest.raises(SystemExit) as excinfo:
        run(argv, defaults)
    msg = str(excinfo.value)
    assert msg.startswith('config error: ') and '\n' not in msg
    return msg


def write(tmp_path, text, name='cfg.py'):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_no_args_returns_new_equal_dict():
    config = run([])
    assert config == DEFAULTS and config is not DEFAULTS


def test_cli_overrides_parse_literals():
    config = run(['--batch_size=32', '--learning_rate=1e-3', '--compile=False', '--device=cuda:1'])
    assert config['batch_size'] == 32 and config['learning_rate'] == 1e-3 and config['compile'] is False
    assert config['device'] == 'cuda:1'  # not a literal: falls back to the raw string
    assert DEFAULTS['batch_size'] == 12  # defaults untouched


def test_unknown_cli_key_suggests_closest():
    msg = error(['--learnig_rate=1e-3'])
    assert msg == "config error: unknown config key 'learnig_rate' (did you mean 'learning_rate'?)"


def test_unknown_key_without_close_match():
    assert error(['--zzzzzz=1']) == "config error: unknown config key 'zzzzzz'"


def test_unknown_key_in_config_file(tmp_path):
    msg = error([write(tmp_path, 'batch_sise = 8\n')])
    assert msg == "config error: unknown config key 'batch_sise' (did you mean 'batch_size'?)"


def test_wrong_type():
    assert error(['--batch_size=abc']) == "config error: config key 'batch_size' expects int, got str 'abc'"
    assert "expects int, got float 1.5" in error(['--max_iters=1.5'])


def test_wrong_type_in_config_file(tmp_path):
    assert "config key 'compile' expects bool, got str 'yes'" in error([write(tmp_path, "compile = 'yes'\n")])


def test_int_accepted_for_float(tmp_path):
    config = run(['--learning_rate=1'])
    assert config['learning_rate'] == 1.0 and type(config['learning_rate']) is float
    config = run([write(tmp_path, 'learning_rate = 2\n')])
    assert type(config['learning_rate']) is float


def test_bool_and_int_are_distinct():
    assert "expects bool, got int 1" in error(['--compile=1'])
    assert "True/False" in error(['--compile=1'])
    assert "expects int, got bool True" in error(['--batch_size=True'])
    assert "expects float, got bool False" in error(['--learning_rate=False'])


def test_bare_bool_flag_means_true():
    assert run(['--compile=False', '--compile'])['compile'] is True
    assert "needs a value" in error(['--batch_size'])


def test_value_containing_equals():
    assert run(['--start=a=b'])['start'] == 'a=b'
    assert run(['--seed={"k": "x=y"}'])['seed'] == {'k': 'x=y'}


def test_string_default_keeps_raw_string():
    config = run(['--out_dir=123', '--start=None'])
    assert config['out_dir'] == '123' and config['start'] == 'None'


def test_none_default_accepts_anything():
    assert run(['--seed=1337'])['seed'] == 1337
    assert run(['--seed=abc'])['seed'] == 'abc'
    assert run(['--seed=[1, 2]'])['seed'] == [1, 2]


def test_missing_config_file(tmp_path):
    missing = str(tmp_path / 'nope.py')
    assert error([missing]) == f"config error: config file not found: {missing}"


def test_file_then_cli_later_wins(tmp_path):
    a = write(tmp_path, 'batch_size = 8\nmax_iters = 50\n', 'a.py')
    b = write(tmp_path, 'batch_size = 16\n', 'b.py')
    config = run([a, '--max_iters=60', b])
    assert config['batch_size'] == 16 and config['max_iters'] == 60
    assert run([b, '--batch_size=4'])['batch_size'] == 4
    assert run(['--batch_size=4', b])['batch_size'] == 16


def test_config_file_computes_from_current_values(tmp_path):
    cfg = write(tmp_path, 'max_iters = max_iters * 5\nlr_decay_iters = max_iters\nout_dir = out_dir + "-big"\n')
    config = run(['--max_iters=200', cfg])
    assert config['max_iters'] == 1000 and config['lr_decay_iters'] == 1000 and config['out_dir'] == 'out-big'


def test_config_file_helpers_are_not_keys(tmp_path):
    cfg = write(tmp_path, 'import math\nfrom math import sqrt\nfrom os import path as osp\n'
                          'def _f(x): return x\ndef scale(x): return 2 * x\nclass Foo: pass\n'
                          '_n_gpus = 8\nbatch_size = scale(int(sqrt(16))) * _n_gpus\n')
    config = run([cfg])
    assert config['batch_size'] == 64
    assert set(config) == set(DEFAULTS)


def test_override_messages_printed(tmp_path, capsys):
    cfg = write(tmp_path, 'batch_size = 8\n')
    configure(DEFAULTS, [cfg, '--compile=False'])
    out = capsys.readouterr().out
    assert f"Overriding config with {cfg}" in out
    assert "Overriding: batch_size = 8" in out and "Overriding: compile = False" in out
    configure(DEFAULTS, [cfg], quiet=True)
    assert capsys.readouterr().out == ''


@pytest.mark.parametrize('flag', ['--help', '-h'])
def test_help_lists_keys_and_exits_0(flag, capsys):
    with pytest.raises(SystemExit) as excinfo:
        configure(DEFAULTS, ['--batch_size=3', flag, '--bogus=1'], description='train a tiny model')
    assert excinfo.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith('train a tiny model')
    for k in DEFAULTS:
        assert f"--{k}=" in out
    assert "--batch_size=12  (int)" in out and "--out_dir='out'  (str)" in out and "--seed=None  (NoneType)" in out


def test_unrecognized_dash_argument():
    assert "unrecognized argument '-x'" in error(['-x'])


def test_config_keys_selects_plain_public_globals():
    import math
    ns = dict(batch_size=12, lr=1e-3, compile=True, out_dir='out', seed=None, _private=1, math=math,
              f=lambda: 0, cls=int, lst=[1], __name__='__main__')
    assert config_keys(ns) == dict(batch_size=12, lr=1e-3, compile=True, out_dir='out', seed=None)
