"""A suite is checked whole before its first run (`sparseft bench`, `--dry-run` and `run_suite`): every row's
options and grid values, every train setting, the backbones, every task's data, the `--only` labels.

Each refusal names the suite file, the row and the key as the file spells them, and nothing is written."""

import copy

import pytest
import yaml
from helpers import make_folder, make_vtab

from sparseft.bench import SuiteError, check_suite, load_suite, run_suite, shipped_suites
from sparseft.cli import main


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    return [make_vtab(root / name, n_train=4, n_val=2, n_test=2, classes=2) for name in ("a", "b")]


def suite_dict(tasks) -> dict:
    return {"name": "tiny", "protocol": "honest",
            "tasks": {"natural": [str(tasks[0])], "structured": [str(tasks[1])]},
            "backbones": [{"name": "test_vit", "img_size": 32}],
            "train": {"epochs": 1, "batch_size": 4, "warmup_epochs": 0},
            "grid": {"lr": [1.0e-3, 3.0e-3]}, "extend_edges": 0,
            "methods": [{"label": "gps", "method": "gps", "options": {"k": 1}},
                        {"label": "full", "method": "full", "grid": {"lr": [1.0e-4]}},
                        {"label": "linear", "method": "linear", "grid": {"lr": [1.0e-2]}}]}


def write(tmp_path, data: dict):
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def refused_by_cli(capsys, argv: list[str]) -> str:
    """Run the CLI; it must exit 1 with one line `error: ...`; returns that line."""
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_an_option_of_another_method_is_refused_up_front_as_the_cli_refuses_it(tmp_path, tasks, capsys):
    data = suite_dict(tasks)
    data["methods"][2]["options"] = {"k": 2}  # `sparseft train --method linear --k 2` is refused too
    path, out = write(tmp_path, data), tmp_path / "res"
    for extra in (["--dry-run"], []):
        err = refused_by_cli(capsys, ["bench", str(path), "--out", str(out), *extra])
        assert str(path) in err and "row 'linear' (methods[2]) options.k" in err
        assert "'k' is not an option of method 'linear' (it belongs to gps, rosa, spiel); linear takes" in err
        assert not out.exists()  # no suite.json, no run
    capsys.readouterr()
    assert main(["train", "--method", "linear", "--k", "2", "--data", str(tasks[0]), "--out", str(tmp_path / "r"),
                 "--model", "test_vit"]) == 2
    assert "--k is not an option of method 'linear' (it belongs to gps, rosa, spiel)" in capsys.readouterr().err


def test_a_bad_grid_value_of_a_later_row_is_refused_before_the_first_run(tmp_path, tasks, capsys):
    data = suite_dict(tasks)
    data["methods"][1]["grid"] = {"lr": [-1]}  # the second row: earlier rows must not run first
    path, out = write(tmp_path, data), tmp_path / "res"
    err = refused_by_cli(capsys, ["bench", str(path), "--out", str(out)])
    assert err == f"error: {path}: row 'full' (methods[1]) grid.lr: lr must be > 0 (and a float32), not -1"
    assert not out.exists()
    assert refused_by_cli(capsys, ["bench", str(path), "--out", str(out), "--dry-run"]) == err
    assert not out.exists()


def _set(data, keys, value):
    node = data
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value


BAD_VALUES = [  # (where in the suite, value, what the message must say)
    (("train", "epochs"), 0, "train.epochs (row 'gps'): epochs must be >= 1, not 0"),
    (("train", "batch_size"), 0, "train.batch_size (row 'gps'): batch_size must be >= 1, not 0"),
    (("train", "workers"), "two", "train.workers (row 'gps'): workers must be a whole number, not 'two'"),
    (("methods", 0, "train"), {"optimizer": "sgd"},
     "row 'gps' (methods[0]) train.optimizer: optimizer must be one of 'adamw', 'adam', not 'sgd'"),
    (("grid", "lr"), ["1e-3"], "grid.lr (row 'gps'): lr must be a number or null, not '1e-3' (YAML reads 1e-3 as text"),
    (("grid", "lr"), [1.0e-9], "grid.lr (row 'gps'): min_lr must be between 0 and lr, not 1e-08"),
    (("grid", "k"), [1], "grid.k (row 'full'): 'k' is not an option of method 'full'"),
    (("methods", 0, "options"), {"k": 1.5}, "row 'gps' (methods[0]) options.k: k must be a whole number, not 1.5"),
    (("methods", 0, "options"), {"k": 0}, "row 'gps' (methods[0]) options.k: k must be a whole number of at least 1"),
    (("methods", 0, "options"), {"level": "atom"}, "row 'gps' (methods[0]) options.level: level must be one of"),
    (("methods", 0, "options"), {"kk": 1}, "options.kk: 'kk' is not an option of method 'gps' (no method takes it)"),
    (("methods", 0, "options"), {"budget": 10, "level": "layer"},
     "row 'gps' (methods[0]) options.budget: gps: budget fills top-K per neuron; level layer takes k instead"),
    (("methods", 0, "grid"), {"k": [1, -2]}, "row 'gps' (methods[0]) grid.k: k must be a whole number of at least 1"),
    (("methods", 0, "per_task"), {"nosuch": {"k": 2}},
     "row 'gps' (methods[0]) per_task.nosuch: no task of this suite is named 'nosuch'"),
    (("methods", 2, "per_task"), {"a": {"k": 2}}, "row 'linear' (methods[2]) per_task.a.k: 'k' is not an option"),
    (("methods", 1, "backbones"), ["vit_nosuch"], "row 'full' (methods[1]) backbones: vit_nosuch is not a backbone"),
    (("methods", 2, "label"), "a/b", "label 'a/b' must be a name"),
    (("methods", 2, "options"), ["k", 2], "methods[2] (label 'linear') options: must be a mapping"),
    (("backbones", 0, "img_size"), "32", "backbones[0] img_size: must be a whole number or null, not '32'"),
    (("backbones", 0, "img_size"), 0,
     "backbones[0] (test_vit) img_size (row 'gps'): img_size must be >= 1 when given, not 0"),
    (("backbones", 0, "pretrained"), "no", "backbones[0] pretrained: must be true or false, not 'no'"),
    (("backbones", 0, "name"), "vit_nosuch", "backbones[0] name: unknown model 'vit_nosuch'"),
    (("backbones", 0, "weights"), "missing.safetensors",
     "backbones[0] (test_vit@32) weights: missing.safetensors is not a file"),
    (("backbones", 0, "train"), {"epochs": -1}, "backbones[0] (test_vit@32) train.epochs (row 'gps'): epochs must be"),
    (("backbones", 0, "train"), {"epoch": 2}, "backbones[0] has unknown train settings ['epoch']"),
    (("train",), ["epochs", 1], "train: must be a mapping (key: value), not ['epochs', 1]"),
]


@pytest.mark.parametrize(("keys", "value", "says"), BAD_VALUES, ids=[f"{'.'.join(map(str, k))}={v!r}"
                                                                     for k, v, _ in BAD_VALUES])
def test_every_bad_value_is_refused_naming_file_row_and_key(tmp_path, tasks, keys, value, says):
    data = copy.deepcopy(suite_dict(tasks))
    _set(data, keys, value)
    path, out = write(tmp_path, data), tmp_path / "res"
    with pytest.raises(SuiteError) as refused:
        run_suite(load_suite(path), out, progress=False)
    message = str(refused.value)
    assert message.startswith(f"{path}: ") and says in message, message
    assert "--" not in message  # the suite's keys, not the command line's flags
    assert not out.exists()


def test_the_paper_protocol_checks_each_row_s_paper_point(tmp_path, tasks, capsys):
    data = suite_dict(tasks)
    data["methods"][2]["paper"] = {"lr": 0}
    path, out = write(tmp_path, data), tmp_path / "res"
    check_suite(load_suite(path))  # honest: the paper point is never run
    err = refused_by_cli(capsys, ["bench", str(path), "--out", str(out), "--protocol", "paper", "--dry-run"])
    assert err == f"error: {path}: row 'linear' (methods[2]) paper.lr: lr must be > 0 (and a float32), not 0"
    assert not out.exists()


def test_every_task_is_read_before_the_first_run(tmp_path, tasks, monkeypatch):
    monkeypatch.setenv("SPARSEFT_CACHE", str(tmp_path / "empty-cache"))  # nothing provisioned, nothing fetched
    monkeypatch.delenv("NOSUCH_ROOT", raising=False)
    pictures = make_folder(tmp_path / "pictures")  # class subfolders: an ImageFolder tree
    renamed = make_vtab(tmp_path / "other" / tasks[0].name)
    cases = [(str(pictures), "tasks.structured[0]: ", "use folder:"),
             (str(tmp_path / "nowhere"), "tasks.structured[0]: ", "no such folder"),
             ("${NOSUCH_ROOT}/cifar", "tasks.structured[0]: ", "the environment variable NOSUCH_ROOT is not set"),
             ("mini-vtab/nosuch", "tasks.structured[0]: ", "mini-vtab has no task 'nosuch'"),
             (str(renamed), "tasks.structured[0]: ", f"has the name 'a' of tasks.natural[0] ({tasks[0]})"),
             (str(tasks[0]), "tasks.structured[0]: ", "is listed twice"),
             ("mini-vtab/clipart", "tasks mini-vtab/clipart are not provisioned",
              "run `sparseft data fetch mini-vtab --tasks clipart`")]
    for spec, where, says in cases:
        data = suite_dict(tasks)
        data["tasks"]["structured"] = [spec]
        path, out = write(tmp_path, data), tmp_path / "res"
        with pytest.raises(SuiteError) as refused:
            run_suite(load_suite(path), out, progress=False)
        assert str(refused.value).startswith(f"{path}: ") and where in str(refused.value) and says in str(refused.value)
        assert not out.exists()
    data = suite_dict(tasks)
    data["tasks"]["structured"] = [f"folder:{pictures}"]  # as the message says: accepted
    check_suite(load_suite(write(tmp_path, data)))


def test_only_with_a_label_no_row_has_is_an_error_naming_the_labels(tmp_path, tasks, capsys):
    path, out = write(tmp_path, suite_dict(tasks)), tmp_path / "res"
    for only in (["nosuch"], ["gps", "nosuch"]):
        for extra in (["--dry-run"], []):
            err = refused_by_cli(capsys, ["bench", str(path), "--out", str(out), "--only", *only, *extra])
            assert err == f"error: {path}: --only nosuch: no row has this label; labels: gps, full, linear"
            assert not out.exists()
    with pytest.raises(SuiteError, match="--only gsp: no row"):
        run_suite(load_suite(path), out, progress=False, only=["gsp"])
    assert not out.exists()


def test_a_dry_run_of_a_good_suite_lists_its_cells_and_writes_nothing(tmp_path, tasks, capsys):
    path, out = write(tmp_path, suite_dict(tasks)), tmp_path / "res"
    capsys.readouterr()
    assert main(["bench", str(path), "--out", str(out), "--dry-run", "--only", "gps", "linear"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"4 cells, 8 training runs -> {out}" and len(lines) == 5
    assert not out.exists()
    out.mkdir()
    (out / "suite.json").write_text('{"name": "other", "protocol": "honest"}')  # what a run would refuse, so does this
    err = refused_by_cli(capsys, ["bench", str(path), "--out", str(out), "--dry-run"])
    assert "holds results of name 'other', not 'tiny'" in err


@pytest.mark.parametrize("name", shipped_suites())
def test_every_shipped_suite_passes_the_checks_without_its_data(name, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEFT_CACHE", str(tmp_path / "empty-cache"))  # nothing here is read or fetched
    check_suite(load_suite(name), files=False)
    assert not (tmp_path / "empty-cache").exists()


@pytest.mark.parametrize("key", ["methods", "tasks", "backbones"])
def test_a_suite_that_would_run_nothing_is_refused(tmp_path, tasks, capsys, key):
    data = suite_dict(tasks)
    data[key] = {} if key == "tasks" else []
    path, out = write(tmp_path, data), tmp_path / "res"
    for extra in (["--dry-run"], []):
        err = refused_by_cli(capsys, ["bench", str(path), "--out", str(out), *extra])
        assert str(path) in err and f"'{key}' is empty, so the suite would run nothing" in err
        assert not out.exists()


def test_a_suite_file_that_is_not_utf8_text_is_refused_naming_it(tmp_path, capsys):
    path, out = tmp_path / "suite.yaml", tmp_path / "res"
    path.write_bytes(b"\xff\xfe\x00name: x\n")
    err = refused_by_cli(capsys, ["bench", str(path), "--out", str(out), "--dry-run"])
    assert str(path) in err and "not UTF-8 text" in err
    assert not out.exists()


def test_an_img_size_that_is_no_multiple_of_the_vit_patch_is_refused_up_front(tmp_path, tasks, capsys):
    data = suite_dict(tasks)
    data["backbones"][0]["img_size"] = 30  # test_vit's patches are 16 px: `sparseft train --img-size 30` refuses it
    path, out = write(tmp_path, data), tmp_path / "res"
    for extra in (["--dry-run"], []):
        err = refused_by_cli(capsys, ["bench", str(path), "--out", str(out), *extra])
        assert str(path) in err and "backbones[0] (test_vit@30) img_size" in err
        assert "not a positive multiple of test_vit's patch size 16" in err
        assert not out.exists()
