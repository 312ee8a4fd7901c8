"""Config values are typed and range-checked wherever they come from (file, command line, keyword)."""
import json
import math

import pytest

from minissl.config import Config, FieldError, coerce, config_from_dict, field_help, load_config, resolve_args
from minissl.methods.bcp import BCPArgs


def test_yaml_strings_are_typed(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text('lr: 1e-3\nmax_iters: "20"\nresume: "false"\nbudget: null\nseed: 3.0\n')  # PyYAML: "1e-3" is a str
    cfg = load_config(str(f))
    assert (cfg.lr, cfg.max_iters, cfg.resume, cfg.budget, cfg.seed) == (0.001, 20, False, None, 3)
    assert type(cfg.lr) is float and type(cfg.max_iters) is int and type(cfg.seed) is int


@pytest.mark.parametrize("kw, match", [
    ({"max_iters": True}, "max_iters: expected an integer, got True"),
    ({"lr": "fast"}, "lr: expected a number, got 'fast'"),
    ({"ema_decay": math.inf}, r"ema_decay: expected a number in \[0, 1\], got inf"),
    ({"method": 3}, "method: expected a string, got 3"),
    ({"run_name": "a/../../b"}, "run_name: expected a folder name inside out_dir"),
    ({"labeled_bs": 0}, "labeled_bs: expected 0 < labeled_bs <= batch_size, got 0"),
    ({"progress": None}, "progress: expected a value of type bool, got None"),
])
def test_keyword_values_are_checked_too(kw, match):
    with pytest.raises(ValueError, match=match):
        load_config(**kw)


def test_json_file_errors_name_file_and_line(tmp_path):
    f = tmp_path / "c.json"
    f.write_text('{\n  "lr": 0.1,\n}\n')
    with pytest.raises(ValueError, match=f"config file {f}: not valid JSON at line 3"):
        load_config(str(f))
    f.write_text(json.dumps({"lr": -1}))
    with pytest.raises(ValueError, match=f"config file {f}: lr: expected a finite number > 0, got -1.0"):
        load_config(str(f))


def test_saved_config_is_checked_when_read(tmp_path):
    with pytest.raises(ValueError, match="config.json: lr: expected a finite number > 0"):
        config_from_dict({"lr": 0, "method_resolved": {}}, where="config.json")
    assert config_from_dict({"lr": "0.5", "suite_spec": {}}).lr == 0.5


def test_method_args_typed_like_config_fields():
    args = resolve_args(BCPArgs, {"pretrain": "0.5", "u_weight": 1}, "bcp")
    assert args.pretrain == 0.5 and type(args.u_weight) is float
    with pytest.raises(ValueError, match="method 'bcp': --u_weight: expected a number, got 'x'"):
        resolve_args(BCPArgs, {"u_weight": "x"}, "bcp")
    with pytest.raises(ValueError, match=r"unknown option --u_wieght for method 'bcp' \(did you mean --u_weight, --cons_weight\?\)"):
        resolve_args(BCPArgs, {"u_wieght": 0.5}, "bcp")
    with pytest.raises(ValueError, match="method_args: expected a mapping"):
        resolve_args(BCPArgs, 5, "bcp")


def test_coerce_refuses_what_it_cannot_read():
    assert coerce("n", "7", "Optional[int]") == 7 and coerce("n", "none", "Optional[int]") is None
    with pytest.raises(FieldError, match="n: expected an integer, got 7.5"):
        coerce("n", 7.5, "int")
    with pytest.raises(FieldError, match="x: expected a finite number, got nan"):
        coerce("x", float("nan"), "float")


def test_every_config_field_has_a_comment():
    notes = field_help(Config)
    assert set(notes) == set(Config.__dataclass_fields__)
    assert notes["ema_decay"] == "EMA teacher decay; None = each method's ema_horizon (a fraction of the run)"
