"""TaskBank: many task files on one base, switched in place; the base bit-exact after any switches."""

import random

import pytest
import torch
from helpers import toy_base, toy_batches, write_task

import sparseft
from sparseft.deltafile import DeltaFileError
from sparseft.methods import METHODS, MethodContext, get_method

MERGEABLE = sorted(m for m, cls in METHODS.items() if cls.mergeable)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    out = {m: write_task(m, root / f"{m}.safetensors") for m in MERGEABLE}
    out["gps-2"] = write_task("gps", root / "gps-2.safetensors", seed=2)
    out["gps-5"] = write_task("gps", root / "gps-5.safetensors", classes=5, seed=3)
    return out


def bank_of(model: torch.nn.Module, files: dict, names: tuple[str, ...]) -> sparseft.TaskBank:
    bank = sparseft.TaskBank(model)
    for name in names:
        bank.add(name, files[name])
    return bank


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_state(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert list(state) == list(expected)
    for name, value in state.items():
        assert torch.equal(value, expected[name]), name


def test_every_mergeable_method_switches_to_exactly_its_merged_model(files):
    model = toy_base()
    bank = sparseft.TaskBank(model)
    for method in MERGEABLE:
        bank.add(method, files[method])
    params = {n: (p, p.data_ptr()) for n, p in model.named_parameters()}
    for method in MERGEABLE:
        bank.use(method)
        assert bank.active == method
        assert_state(model, state_of(sparseft.merge(sparseft.load(files[method]))))
    # switching writes into the model's own tensors: same parameter objects, same storage
    assert {n: (p, p.data_ptr()) for n, p in model.named_parameters()} == params
    assert bank.header("gps")["class_names"] == ["a", "b", "c"]


def test_the_base_is_bit_exact_after_any_sequence_of_switches(files):
    model = toy_base()
    expected = state_of(model)
    bank = sparseft.TaskBank(model)
    names = ["gps", "gps-2", "lora", "full", "ssf", "gps-5"]
    for name in names:
        bank.add(name, files[name])
    rng = random.Random(0)
    for _ in range(40):
        bank.use(rng.choice([*names, None]))
    with bank.use("lora"):
        with bank.use("gps-5"):
            assert bank.active == "gps-5"
        assert bank.active == "lora"
    bank.use(None)
    assert_state(model, expected)


def test_a_head_of_another_size_is_swapped_and_put_back(files):
    model = toy_base(classes=3)
    head = dict(model.named_parameters())["head.weight"]
    bank = sparseft.TaskBank(model)
    bank.add("five", files["gps-5"])
    x = toy_batches(1, batch=2, classes=3)[0][0]
    with torch.no_grad(), bank.use("five"):
        out = model(x)
        expected = sparseft.merge(sparseft.load(files["gps-5"], model=toy_base(classes=5)))(x)
    assert out.shape == (2, 5)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    assert dict(model.named_parameters())["head.weight"].shape == (3, head.shape[1])


def test_a_batch_of_mixed_tasks_is_served_grouped_by_task(files):
    model = toy_base()
    bank = bank_of(model, files, ("gps", "lora", "gps-5"))
    bank.use("lora")
    model.train()
    x = toy_batches(1, batch=5, classes=3)[0][0]
    tasks = ["gps", "gps-5", None, "gps", "lora"]
    out = bank.predict(x, tasks)
    assert bank.active == "lora" and model.training  # what was active, and the mode, are restored
    for i, task in enumerate(tasks):
        with torch.no_grad(), bank.use(task):
            model.eval()
            torch.testing.assert_close(out[i], model(x[i:i + 1])[0], atol=1e-6, rtol=0)
    assert [len(o) for o in out] == [3, 5, 3, 3, 3]


def test_refusals_leave_the_bank_and_the_base_as_they_were(files, tmp_path):
    model = toy_base()
    expected = state_of(model)
    bank = sparseft.TaskBank(model)
    bank.add("gps", files["gps"])
    bank.use("gps")
    active = state_of(model)
    with pytest.raises(DeltaFileError, match="another base model"):
        bank.add("foreign", write_task("gps", tmp_path / "foreign.safetensors", base_seed=1))
    with pytest.raises(sparseft.DeltaError, match="adapter task adds modules that cannot be merged"):
        bank.add("adapter", write_task("adapter", tmp_path / "adapter.safetensors"))
    with pytest.raises(ValueError, match="already in the bank"):
        bank.add("gps", files["gps-2"])
    with pytest.raises(KeyError, match="no task 'nope'"):
        bank.use("nope")
    assert bank.tasks == ["gps"] and bank.active == "gps"
    assert_state(model, active)
    bank.remove("gps")
    assert_state(model, expected)
    with pytest.raises(sparseft.DeltaError, match="plain base model"):
        sparseft.TaskBank(sparseft.load(files["gps"]))


def test_predict_refuses_a_batch_the_base_cannot_take_naming_the_shape_it_takes(files):
    """timm's "Input height (16) doesn't match model (32)" and "3 images but 1 task names" (a [C, H, W] image read as
    three) become one line naming the [N, C, H, W] batch the base takes; an unknown task is an InputError and still
    a KeyError."""
    from sparseft.errors import InputError
    from sparseft.taskbank import UnknownTask

    model = toy_base()
    bank = sparseft.TaskBank(model)
    bank.add("gps", files["gps"])
    want = (r"predict: images must be a \[N, 3, 32, 32\] batch for this bank's base \(or another size that is a "
            r"multiple of its patch, 16x16 px\), got ")  # test_vit is built with dynamic_img_size
    for mode in ("grouped", "one-forward"):
        with pytest.raises(InputError, match=want + r"\[2, 3, 24, 24\]$"):
            bank.predict(torch.randn(2, 3, 24, 24), ["gps", None], mode=mode)
        with pytest.raises(InputError, match=want + r"one image \[3, 32, 32\]: images.unsqueeze\(0\)"):
            bank.predict(torch.randn(3, 32, 32), ["gps"], mode=mode)
        with pytest.raises(InputError, match=want + r"\[2, 1, 32, 32\]$"):
            bank.predict(torch.randn(2, 1, 32, 32), ["gps", None], mode=mode)
        with pytest.raises(UnknownTask, match=r"^no task 'nope' in the bank \(it holds 'gps'\)$"):
            bank.predict(torch.randn(2, 3, 32, 32), ["gps", "nope"], mode=mode)
    with pytest.raises(InputError, match=r"images must be a tensor, a \[N, 3, 32, 32\] batch .*, got a list$"):
        bank.predict([torch.randn(3, 32, 32)], ["gps"])
    with pytest.raises(InputError, match=r"tasks must name one task per image, got the string 'gps'"):
        bank.predict(torch.randn(3, 3, 32, 32), "gps")
    err = UnknownTask("no task 'x' in the bank (it holds none)")
    assert isinstance(err, KeyError) and isinstance(err, sparseft.errors.SparseftError)
    assert str(err) == "no task 'x' in the bank (it holds none)"  # not quoted as a KeyError's
    assert bank.active is None and len(bank.predict(torch.randn(2, 3, 32, 32), ["gps", None])) == 2
    assert len(bank.predict(torch.randn(2, 3, 16, 16), ["gps", None])) == 2  # a size it takes
    fixed = sparseft.create_model("test_vit", num_classes=3, img_size=32, dynamic_img_size=False).eval()
    with pytest.raises(InputError, match=r"must be a \[N, 3, 32, 32\] batch for this bank's base, got \[2, 3, 16, 16"):
        sparseft.TaskBank(fixed).predict(torch.randn(2, 3, 16, 16), [None, None])  # timm: "Input height (16) ..."


def test_memory_follows_the_task_files(files):
    from safetensors.torch import load_file

    model = toy_base()
    bank = sparseft.TaskBank(model)
    bank.add("gps", files["gps"])
    bank.add("gps-2", files["gps-2"])
    size = files["gps"].stat().st_size + files["gps-2"].stat().st_size
    payload = sum(t.numel() * t.element_size() for f in ("gps", "gps-2") for t in load_file(files[f]).values())
    for active in (None, "gps", "gps-2", None):  # an active task's place in the bank holds the base's values
        bank.use(active)
        mem = bank.memory()
        assert mem["files"] == size and mem["held"] == bank.nbytes()
        assert mem["ratio"] <= 1.1  # the goal: at most 1.1x the task files
        # int32 indices and one value per entry, the task's (or, while it is active, the base's), nothing else:
        # exactly the tensors the files hold
        assert mem["held"] == payload
    model_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    held = {t.untyped_storage().data_ptr() for changes in bank._tasks.values() for c in changes.values()
            for t in (c.index, c.value) if t is not None}
    assert not held & model_storages  # no storage shared with the model: nothing counted twice, or lost
    bank.remove("gps")
    assert bank.memory()["files"] == files["gps-2"].stat().st_size


def test_a_compiled_model_does_not_recompile_when_tasks_switch(files):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = toy_base()
    bank = sparseft.TaskBank(model)
    bank.add("gps", files["gps"])
    bank.add("gps-2", files["gps-2"])
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    x = toy_batches(1, batch=2, classes=3)[0][0]
    with torch.no_grad():
        for task in ("gps", "gps-2", None, "gps"):
            bank.use(task)
            torch.testing.assert_close(compiled(x), model(x), atol=1e-6, rtol=0)
    assert counter.frame_count == 1


def test_predict_gives_every_module_its_own_mode_back(files):
    model = toy_base()
    bank = sparseft.TaskBank(model)
    bank.add("gps", files["gps"])
    model.train()
    model.blocks[0].eval()
    bank.predict(toy_batches(1, batch=2, classes=3)[0][0], ["gps", None])
    assert model.training and not model.blocks[0].training and model.blocks[1].training


def _bn_task(path, classes: int = 3) -> tuple[torch.nn.Module, object]:
    """A GPS task on a BatchNorm CNN whose running statistics changed (the task file holds buffers)."""
    torch.manual_seed(0)
    model = sparseft.create_model("test_resnet", num_classes=3, img_size=32).eval()
    x, y = toy_batches(1, batch=6, classes=3)[0]
    ctx = MethodContext(loader={"select": [([x, x.flip(-1)], y)], "train": [(x, y)]}.__getitem__, progress=False)
    if classes != 3:
        model.reset_classifier(classes)
    gps = get_method("gps", batchnorm="update")
    task = gps.prepare(model, ctx)
    task.train()(x)  # BatchNorm statistics of the task
    gps.save(task, path, extra={"model": "test_resnet", "num_classes": classes, "img_size": 32})
    torch.manual_seed(0)
    return sparseft.create_model("test_resnet", num_classes=3, img_size=32).eval(), path


def test_the_bank_follows_the_model_when_it_is_cast_after_the_tasks_were_read(files, tmp_path):
    """`.to(dtype)` (or `.cuda()`) after `add`: buffers are new tensors then and the kept values have the
    old dtype; switches must still give the merged task, and the base back exactly."""
    x = toy_batches(1, batch=2, classes=3)[0][0].double()
    # a ViT: sparse entries, whole tensors and a head of another size (swapped)
    model = toy_base()
    bank = bank_of(model, files, ("gps", "lora", "gps-5"))
    bank.use("gps-5")
    model.double()
    for name, classes in (("gps", 3), ("gps-5", 5), ("lora", 3)):
        bank.use(name)
        expected = sparseft.merge(sparseft.load(files[name], model=toy_base(classes))).double()
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected(x), atol=0, rtol=0)
    bank.use(None)
    assert_state(model, state_of(toy_base().double()))
    # a CNN whose task changes BatchNorm statistics (buffers)
    model, path = _bn_task(tmp_path / "bn.safetensors")
    bank = sparseft.TaskBank(model)
    bank.add("bn", path)
    model.double()
    expected = sparseft.merge(sparseft.load(path, model=_bn_task(tmp_path / "again.safetensors")[0])).double()
    with torch.no_grad(), bank.use("bn"):
        torch.testing.assert_close(model(x), expected.eval()(x), atol=0, rtol=0)


def test_removing_the_task_an_outer_block_switches_back_to_leaves_the_base(files):
    model = toy_base()
    expected = state_of(model)
    bank = sparseft.TaskBank(model)
    bank.add("a", files["gps"])
    bank.add("b", files["gps-2"])
    with bank.use("a"):
        with bank.use("b"):
            bank.remove("a")
        assert bank.active is None
    assert_state(model, expected)


def test_a_base_in_another_dtype_is_named_as_the_reason(files):
    with pytest.raises(DeltaFileError, match="weights are bfloat16, and the fingerprint covers the dtype"):
        sparseft.TaskBank(toy_base().to(torch.bfloat16)).add("gps", files["gps"])


def _step_all(model: torch.nn.Module) -> None:
    """One optimizer step on every parameter (what a user fine-tuning the active task further does)."""
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(toy_batches(1, batch=2, classes=3)[0][0]).sum().backward()
    opt.step()


@pytest.mark.parametrize("active", ["gps", None])
def test_a_switch_after_the_weights_were_written_outside_the_bank_is_refused(files, active):
    model = toy_base()
    bank = bank_of(model, files, ("gps", "gps-2"))
    bank.use(active)
    before_step = state_of(model)
    _step_all(model)
    at_refusal = state_of(model)
    stepped = {n for n, v in at_refusal.items() if not torch.equal(v, before_step[n])}
    shown = "task 'gps'" if active else "the base"
    for attempt, target in ((lambda: bank.use("gps-2"), "task 'gps-2'"),
                            (lambda: bank.use(None if active else "gps"), "the base" if active else "task 'gps'"),
                            (lambda: bank.predict(toy_batches(1, batch=2, classes=3)[0][0], ["gps-2", None]), None)):
        with pytest.raises(sparseft.DeltaError) as err:
            attempt()
        message = str(err.value)
        if target is not None:
            assert message.startswith(f"cannot switch to {target}: ")
        assert f"while {shown} was active" in message
        named = message.split("outside what the bank wrote (", 1)[1].split(")", 1)[0].removesuffix(", …").split(", ")
        assert len(named) == 4 and set(named) <= stepped  # the first few, and how many
        assert f": {len(stepped)} tensor(s) of the model were written" in message
        assert "sparseft.base_model" in message  # how to recover
        assert bank.active == active
        assert_state(model, at_refusal)  # nothing switched, nothing restored
    with pytest.raises(sparseft.DeltaError, match="cannot add task 'lora'"):
        bank.add("lora", files["lora"])
    assert bank.tasks == ["gps", "gps-2"]
    assert_state(model, at_refusal)
    if active is not None:  # removing the active task switches to the base first
        with pytest.raises(sparseft.DeltaError, match="cannot switch to the base"):
            bank.remove(active)
        assert bank.tasks == ["gps", "gps-2"]
    assert_state(model, at_refusal)


def test_batchnorm_statistics_changed_in_train_mode_are_named_as_such(tmp_path):
    model, path = _bn_task(tmp_path / "bn.safetensors")
    bank = sparseft.TaskBank(model)
    bank.add("bn", path)
    bank.use("bn")
    with torch.no_grad():
        model.train()(toy_batches(1, batch=4, classes=3)[0][0])  # updates the running statistics
    before = state_of(model)
    with pytest.raises(sparseft.DeltaError, match=r"\(conv1.1.num_batches_tracked, .*buffers among them: a forward "
                                                  "pass in train mode updates BatchNorm statistics"):
        bank.use(None)
    assert_state(model, before)


def test_a_forward_in_eval_mode_and_a_cast_are_not_changes(files):
    model = toy_base()
    bank = bank_of(model, files, ("gps", "gps-5"))
    bank.use("gps")
    with torch.no_grad():
        model.eval()(toy_batches(1, batch=2, classes=3)[0][0])
    model.double()  # the model is cast after the tasks were read: the bank follows it
    bank.use("gps-5")
    bank.use(None)
    assert_state(model, state_of(toy_base().double()))


def test_a_segmentation_task_offered_to_a_classification_base_says_so(tmp_path):
    from sparseft.seg import create_segmentation_model

    seg = create_segmentation_model("test_vit", 3, img_size=32)
    method = get_method("linear")
    method.prepare(seg, MethodContext(loader=None, progress=False))
    task = method.save(seg, tmp_path / "seg.safetensors",
                       extra={"model": "test_vit", "num_classes": 3, "img_size": 32, "task": "segmentation"})
    base = sparseft.create_model("test_vit", num_classes=3, img_size=32).eval()
    before = state_of(base)
    bank = sparseft.TaskBank(base)
    with pytest.raises(DeltaFileError) as info:
        bank.add("seg", task)
    message = str(info.value)
    assert str(task) in message and "a segmentation task whose head (decode_head." in message
    assert "sparseft.base_model(" in message and "[" not in message  # one line, not the list of head tensors
    assert len(bank) == 0 and "seg" not in bank
    assert_state(base, before)
