"""The memory plan (`twofold.pipeline.plan`): parameter counts from config.json, bytes per device and part,
the verdict, `twofold plan`, the refusal at train start, and the plan against a measured run's memory/* metrics."""

import json
from types import SimpleNamespace

import pytest
from conftest import SMALL, small_config

from twofold.cli import main
from twofold.config import ConfigError, LoraConfig, ModelConfig, load_config
from twofold.pipeline import plan as P
from twofold.pipeline.plan import (
    Machine,
    format_plan,
    lora_parameter_count,
    memory_plan,
    model_shapes,
    parameter_count,
    parameter_tensors,
    plan_error,
    planned_config,
    read_model_shapes,
    verdict,
)

GIB = 2**30
# Qwen2.5's public config.json values (the keys the plan reads).
QWEN = {
    "0.5B": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "1.5B": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    "7B": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
}  # fmt: skip
P_7B, A_7B = 7_615_616_512, 10_092_544  # 7B parameters; its LoRA r=16 adapters on q/k/v/o
ONE_GPU = Machine(gpus=1, gpu_memory=80 * GIB, host_memory=2**40)


def qwen(size: str) -> dict:
    return {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], **QWEN[size]}


@pytest.fixture
def qwen7b(tmp_path):
    """A folder holding only Qwen2.5-7B's config.json: all a plan reads."""
    folder = tmp_path / "Qwen2.5-7B-Instruct"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(qwen("7B")))
    return folder


def plan_7b(folder, *overrides, machine=ONE_GPU, config=None):
    cfg = planned_config(config, [f"model.path={folder}", "model.warmstart=false", *overrides])
    return memory_plan(cfg, read_model_shapes(folder), machine)


# --------------------------------------------------------------------------- parameter counts


def test_parameter_count_of_a_hand_written_config():
    # vocab 100, hidden 8, 2 layers, 2 heads x head_dim 4 (q: 8), 1 kv head (kv: 4), intermediate 16, untied:
    #   embeddings 100*8 = 800, LM head 800, final norm 8
    #   per layer: q 8*8 = 64, k 8*4 = 32, v 32, o 8*8 = 64 -> 192; MLP 3*8*16 = 384; 2 norms 16 -> 592
    #   800 + 800 + 8 + 2*592 = 2792
    config = dict(model_type="llama", vocab_size=100, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, intermediate_size=16, tie_word_embeddings=False)  # fmt: skip
    assert parameter_count(model_shapes(config)) == 2792
    # 2 embedding-sized + final norm, and per layer 7 weights + 2 norms: 3 + 2*9 = 21 tensors
    assert parameter_tensors(model_shapes(config)) == 21
    # Qwen2 has q/k/v biases: 8 + 4 + 4 = 16 per layer, 2792 + 32 = 2824 (3 more tensors a layer: 27)
    qwen2 = model_shapes({**config, "model_type": "qwen2"})
    assert (parameter_count(qwen2), parameter_tensors(qwen2)) == (2824, 27)
    # a tied head is the embedding matrix: 2824 - 800 = 2024
    assert parameter_count(model_shapes({**config, "model_type": "qwen2", "tie_word_embeddings": True})) == 2024


@pytest.mark.parametrize(("size", "published"), [("0.5B", 494_032_768), ("1.5B", 1_543_714_304), ("7B", P_7B)])
def test_qwen25_parameter_counts_are_the_published_ones(size, published):
    # 7B by hand: embeddings 152064*3584 = 544,997,376, twice (untied); per layer q 3584*3584 + 3584 =
    # 12,848,640, k and v 3584*512 + 512 = 1,835,520 each, o 12,845,056, MLP 3*3584*18944 = 203,685,888,
    # norms 7168 -> 233,057,792; 28 layers 6,525,618,176; + 1,089,994,752 + 3584 = 7,615,616,512
    assert parameter_count(model_shapes(qwen(size))) == published


@pytest.mark.parametrize(
    "config",
    [
        dict(model_type="llama", attention_bias=True, mlp_bias=True, tie_word_embeddings=False),
        dict(model_type="qwen2", tie_word_embeddings=True),
        dict(model_type="qwen3", head_dim=24, tie_word_embeddings=False),  # head_dim != hidden / heads, q/k norms
        dict(model_type="mistral", num_key_value_heads=1, tie_word_embeddings=False),
    ],
)
def test_formula_counts_what_transformers_builds(config):
    """The formula against transformers' own modules of each supported type (built on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=48)  # fmt: skip
    values = {**shape, **config}
    hf = AutoConfig.for_model(values.pop("model_type"), **values)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    params = list(model.parameters())  # tied weights once
    shapes = model_shapes(hf.to_dict())
    assert (parameter_count(shapes), parameter_tensors(shapes)) == (sum(p.numel() for p in params), len(params))


def test_lora_adapter_counts():
    # r (in + out) per targeted projection per layer. 7B, r=16 on q/k/v/o: q 16*(3584+3584) = 114,688,
    # k and v 16*(3584+512) = 65,536 each, o 114,688 -> 360,448 x 28 layers = 10,092,544
    assert lora_parameter_count(model_shapes(qwen("7B")), LoraConfig(r=16)) == A_7B
    # 0.5B: q 16*(896+896) = 28,672, k and v 16*(896+128) = 16,384, o 28,672 -> 90,112 x 24 = 2,162,688
    assert lora_parameter_count(model_shapes(qwen("0.5B")), LoraConfig(r=16)) == 2_162_688
    assert lora_parameter_count(model_shapes(qwen("7B")), LoraConfig(r=0)) == 0


def test_lora_count_is_what_peft_trains(tiny_path):
    from twofold.models import load_policy

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = LoraConfig(r=4, target_modules=targets)
    # the tiny model: hidden 64, 4 heads x 16 (q: 64), 2 kv heads (kv: 32), intermediate 128, 2 layers:
    # q 4*(64+64) = 512, k and v 4*(64+32) = 384, o 512, gate and up 4*(64+128) = 768, down 768 -> 4096 x 2
    assert lora_parameter_count(read_model_shapes(tiny_path), lora) == 8192
    policy = load_policy(tiny_path, ModelConfig(**SMALL, lora=lora))
    assert sum(p.numel() for p in policy.parameters() if p.requires_grad) == 8192


def printed(nbytes: int, unit: int, figure: float) -> bool:
    """`nbytes` is `figure` units as the README prints it: to one decimal (a float) or a whole number (an int)."""
    return abs(nbytes / unit - figure) <= (0.05 if isinstance(figure, float) else 0.5)


@pytest.mark.parametrize(
    ("size", "full", "lora_base", "engine", "snapshot", "lora_snapshot_mib"),
    # the README prints 114 for 7B's 16 bytes per parameter, 113.48 GiB: 113.5
    [("0.5B", 7.4, 1.8, 0.9, 1.8, 8), ("1.5B", 23, 5.8, 2.9, 5.8, 17), ("7B", 113.5, 28, 14, 28, 39)],
)
def test_the_readme_gpu_table(tmp_path, size, full, lora_base, engine, snapshot, lora_snapshot_mib):
    """README's "Your own model on a GPU" figures (GiB unless named), at the precision it prints them."""
    folder = tmp_path / size
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(qwen(size)))
    base = plan_7b(folder, "oldlogits.source=snapshot")
    lora = plan_7b(folder, "oldlogits.source=snapshot", "model.lora.r=16")
    assert printed(base.bytes_of(P.TRAINER_WEIGHTS, P.GRADIENTS, P.OPTIMIZER_STATE), GIB, full)
    assert printed(lora.bytes_of(P.TRAINER_WEIGHTS), GIB, lora_base)
    assert printed(base.bytes_of(P.ENGINE_WEIGHTS), GIB, engine)
    assert printed(base.bytes_of(P.SNAPSHOTS), GIB, snapshot)  # async holds one version, whatever W
    assert printed(lora.bytes_of(P.SNAPSHOTS), 2**20, lora_snapshot_mib)


def test_a_missing_shape_is_a_named_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ConfigError, match="model.path.*no vocab_size, num_hidden_layers"):
        read_model_shapes(tmp_path)


def test_an_unknown_model_type_is_counted_the_same_with_a_warning(qwen7b):
    config = {**qwen("7B"), "model_type": "phi3"}
    (qwen7b / "config.json").write_text(json.dumps(config))
    plan = plan_7b(qwen7b, "model.lora.r=16")
    # phi3 has no q/k/v biases in the formula: 7B - 28 layers x (3584 + 512 + 512) = 7,615,487,488
    assert plan.counts.base == P_7B - 28 * (3584 + 2 * 512)
    assert "model_type 'phi3' is not one of llama, mistral, qwen2, qwen3" in format_plan(plan)


# --------------------------------------------------------------------------- placements and verdicts


def test_7b_full_fine_tune_with_snapshots_on_one_80gib_gpu_is_refused_with_the_overflow(qwen7b):
    plan = plan_7b(qwen7b, "oldlogits.source=snapshot")
    gpu = plan.device("cuda:0")
    # always: weights 4P = 30,462,466,048; AdamW 8P + 4 x 339 tensors = 60,924,933,452; built-in engine 2P
    #   = 15,231,233,024; its KV cache 2 x 28 layers x 4 kv heads x 128 x 2 B x 64 x 1024 tokens = 3,758,096,384;
    #   its prefix cache's bound, 1 GiB -> 111,450,470,732
    # train step: gradients 4P + AdamW's foreach buffer 4P + logits 3 x 512 x 152,064 x 4 = 934,281,216
    #   -> 61,859,213,312 (scoring: one snapshot moved in, 4P: smaller)
    assert gpu.held(P.ALWAYS) == 111_450_470_732
    assert gpu.held(P.TRAIN_STEP) == 61_859_213_312
    assert gpu.peak == 173_309_684_044
    assert gpu.overflow == 173_309_684_044 - 80 * GIB == 87_410_338_124
    # one snapshot of 4P in host memory (async holds the version being trained, whatever W): 30,462,466,048
    assert plan.bytes_of(P.SNAPSHOTS, device="cpu") == 4 * P_7B and plan.device("cpu").fits
    assert not plan.fits
    error = plan_error(plan)
    assert error.field == "model.lora.r"  # the largest part on the GPU: AdamW's moments
    assert "87,410,338,124 bytes" in str(error)


def test_7b_lora_with_snapshots_fits_one_80gib_gpu(qwen7b):
    plan = plan_7b(qwen7b, "oldlogits.source=snapshot", "model.lora.r=16")
    gpu = plan.device("cuda:0")
    # always: weights 4(P + A) = 30,502,836,224; AdamW 8A + 4 x 224 tensors = 80,741,248; engine weights and
    #   KV and prefix caches as for the full fine-tune, 20,063,071,232 -> 50,646,648,704
    # train step: gradients 4A + AdamW buffer 4A + logits = 40,370,176 x 2 + 934,281,216 = 1,015,021,568;
    # publication, larger: two embedding-sized tensors on their way to the engine in bfloat16 (the one loaded and
    # the next), 2 x 152,064 x 3,584 x 2 = 2,179,989,504, and the trainer's merge of the largest adapted weight,
    # q_proj: its float32 copy and the delta's two temporaries, 3 x 4 x 3,584^2 = 154,140,672 -> 2,334,130,176
    assert gpu.held(P.TRAIN_STEP) == 1_015_021_568
    assert gpu.held(P.PUBLISH) == 2_334_130_176
    assert gpu.peak == 50_646_648_704 + 2_334_130_176 < 80 * GIB
    assert plan.bytes_of(P.SNAPSHOTS) == 4 * A_7B  # one version of the adapters: 40,370,176 bytes
    assert plan.fits


def test_the_dedicated_copy_under_lora_is_its_adapters_unless_sharded_or_elsewhere(qwen7b):
    lora = ["oldlogits.source=dedicated", "model.lora.r=16"]
    assert plan_7b(qwen7b, *lora).bytes_of(P.DEDICATED_COPY) == 4 * A_7B  # beside the trainer's frozen base
    assert plan_7b(qwen7b, "oldlogits.source=dedicated").bytes_of(P.DEDICATED_COPY) == 4 * P_7B  # full: whole
    two = Machine(2, 80 * GIB, 2**40)
    # on a device of its own, or gathered whole on rank 0 of a sharded trainer: a base of its own
    assert plan_7b(qwen7b, *lora, "oldlogits.device=cuda:1", machine=two).bytes_of(P.DEDICATED_COPY) == 4 * (
        P_7B + A_7B
    )
    sharded = ["trainer.world_size=2", "trainer.device=cuda"]
    assert plan_7b(qwen7b, *lora, *sharded, machine=two).bytes_of(P.DEDICATED_COPY) == 4 * (P_7B + A_7B)


def test_readme_7b_lora_vllm_command_is_refused_at_vllms_default_share(qwen7b):
    """vLLM needs its share free when it starts, after the trainer's 28 GiB base is on the GPU."""
    readme = ["trainer.device=cuda:0", "trainer.dtype=bfloat16", "engine.backend=vllm", "model.lora.r=16",
              "model.lora.alpha=32", "trainer.max_tokens_per_microbatch=8192"]  # fmt: skip
    plan = plan_7b(qwen7b, *readme, config="configs/frozenlake.yaml")  # oldlogits.source: ewma
    # always: weights 30,502,836,224 + AdamW 80,741,248 + EWMA average 4A 40,370,176 + int(0.9 x 80 GiB)
    #   77,309,411,328; the largest phase, publishing over ipc: the packed buffer, the size of the largest bfloat16
    #   weight L (the embedding, 152,064 x 3,584 x 2 = 1,089,994,752 > 1 GiB), the engine worker's clone of it, and
    #   the weight being packed and the one before it, 4L = 4,359,979,008, plus one merged weight 154,140,672
    #   -> 112,447,478,656, over 80 GiB by 26,548,132,736
    assert plan.bytes_of(P.VLLM_SHARE) == 77_309_411_328
    assert plan.bytes_of(P.TO_ENGINE, device="cuda:0") == 4_359_979_008
    assert plan.bytes_of(P.TO_ENGINE, device="cpu") == 0
    assert plan.device("cuda:0").overflow == 26_548_132_736
    assert plan_error(plan).field == "engine.gpu_memory_utilization"
    # a 0.3 share (25,769,803,776): 60,907,871,104 of 80 GiB
    assert plan_7b(qwen7b, *readme, "engine.gpu_memory_utilization=0.3", config="configs/frozenlake.yaml").fits


def test_8_ranks_shard_the_trainer_and_keep_every_ranks_snapshots_in_host_memory(qwen7b):
    readme = ["trainer.world_size=8", "trainer.device=cuda", "engine.backend=vllm",
              "engine.gpu_memory_utilization=0.3", "oldlogits.source=snapshot"]  # fmt: skip
    plan = plan_7b(qwen7b, *readme, machine=Machine(8, 80 * GIB, 2**40))
    # 16 bytes per parameter over 8 ranks: 2P + 4 x 339 step counts = 15,231,234,380 bytes (14.2 GiB)
    assert plan.bytes_of(P.TRAINER_WEIGHTS, P.GRADIENTS, P.OPTIMIZER_STATE, device="cuda:1") == 2 * P_7B + 4 * 339
    # no rank keeps a copy of the policy: while a held version scores, each keeps its own shard aside, 4P / 8,
    # in the scoring phase, below the train step; the vLLM share is on rank 0's GPU alone
    assert plan.bytes_of(P.OWN_SHARDS_KEPT, device="cuda:1") == 4 * P_7B // 8
    assert plan.device("cuda:1").held(P.SCORING) == 4 * P_7B // 8
    assert plan.bytes_of(P.VLLM_SHARE, device="cuda:1") == 0 < plan.bytes_of(P.VLLM_SHARE, device="cuda:0")
    # host: 8 ranks x 1 version x 4P / 8 = 4P
    assert plan.bytes_of(P.SNAPSHOTS, device="cpu") == 4 * P_7B
    assert [d.device for d in plan.devices] == [*(f"cuda:{i}" for i in range(8)), "cpu"]
    assert plan.fits
    # cuda:0 publishing: one gathered float32 embedding (2,179,989,504) and vLLM's ipc buffers and weights (4L =
    # 4,359,979,008), below the train step's 8,549,897,728: 37,193,229,900 + that = 45,743,127,628
    assert plan.device("cuda:0").held(P.PUBLISH) == 6_539_968_512
    assert plan.device("cuda:0").peak == 45_743_127_628
    assert "fits: cuda:0 42.6 GiB of 80.0 GiB, cuda:1-7 each 18.6 GiB of 80.0 GiB" in format_plan(plan)


def test_publication_is_counted_where_it_happens(qwen7b):
    """Weights stream to the built-in engine (`iter_full_weights`): two embedding-sized tensors in bfloat16 on the
    engine's device, 2 x 152,064 x 3,584 x 2 = 2,179,989,504; a sharded rank's float32 gather of one, 4 x
    152,064 x 3,584 = 2,179,989,504, on every rank's GPU; under Ray a dict of every weight plus its copy in the
    object store, 2 x 2P, in host memory."""
    two = plan_7b(qwen7b, "trainer.world_size=2", "trainer.device=cuda", machine=Machine(2, 80 * GIB, 2**40))
    assert two.bytes_of(P.TO_ENGINE, device="cuda:0") == 2_179_989_504
    assert two.bytes_of(P.GATHERED_WEIGHT, device="cuda:0") == two.bytes_of(P.GATHERED_WEIGHT, device="cuda:1")
    assert two.bytes_of(P.GATHERED_WEIGHT, device="cuda:1") == 2_179_989_504
    assert plan_7b(qwen7b).bytes_of(P.GATHERED_WEIGHT) == 0  # one unsharded rank publishes its own tensors
    ray = plan_7b(qwen7b, "runtime.backend=ray", "runtime.ray.address=planned")
    assert ray.bytes_of(P.TO_ENGINE, device="cpu") == 2 * 2 * P_7B and ray.bytes_of(P.TO_ENGINE, device="cuda:0") == 0
    # LoRA on modules the plan has no shapes for: counted as no merge (a warning), not a crash
    odd = plan_7b(qwen7b, "model.lora.r=16", "model.lora.target_modules=[c_attn]")
    assert odd.bytes_of(P.GATHERED_WEIGHT) == 0


def test_placements_that_cannot_work(qwen7b):
    keys = {p.key for p in plan_7b(qwen7b, "trainer.device=cuda:1").problems}
    assert keys == {"trainer.device"}  # GPU 1 of a one-GPU machine
    keys = {p.key for p in plan_7b(qwen7b, "trainer.world_size=8", machine=Machine(4, 80 * GIB, 2**40)).problems}
    assert keys == {"trainer.world_size"}
    budget = plan_7b(qwen7b, "oldlogits.source=snapshot", "oldlogits.snapshot_budget=1GiB")
    assert {p.key for p in budget.problems} == {"oldlogits.snapshot_budget"}  # one version is 28.4 GiB
    # 0.1 x 80 GiB = 8 GiB cannot hold 7B's 14.2 GiB of bfloat16 weights
    small = plan_7b(qwen7b, "model.lora.r=16", "engine.backend=vllm", "engine.gpu_memory_utilization=0.1")
    assert {p.key for p in small.problems} == {"engine.gpu_memory_utilization"} and not small.fits


def test_a_cpu_machine_holds_everything_in_host_memory(qwen7b):
    plan = plan_7b(qwen7b, "oldlogits.source=snapshot", machine=Machine(0, 0, None))
    assert [d.device for d in plan.devices] == ["cpu"]
    assert plan.fits  # host memory unknown: not checked
    # on the CPU, snapshots stay with the trainer: no version is moved in to score, no foreach buffer
    assert plan.bytes_of(P.SNAPSHOT_IN_USE, P.OPTIMIZER_TEMPORARIES) == 0
    tight = plan_7b(qwen7b, "oldlogits.source=snapshot", machine=Machine(0, 0, 64 * GIB))
    assert not tight.fits and plan_error(tight).field == "model.lora.r"  # the largest part: AdamW, 56.7 GiB


def test_disk_snapshots_hold_no_memory_until_a_version_is_scored(qwen7b):
    """`oldlogits.snapshot_device=disk` on a CPU machine: the held version, 4P bytes, is on disk, unchecked; the
    host holds it only while it scores (a phase), so the host's peak is 4P lower than with snapshots in memory,
    whose own peak holds the version always."""
    machine = Machine(0, 0, None)
    disk = plan_7b(qwen7b, "oldlogits.source=snapshot", "oldlogits.snapshot_device=disk", machine=machine)
    memory = plan_7b(qwen7b, "oldlogits.source=snapshot", machine=machine)
    assert [d.device for d in disk.devices] == ["cpu", "disk"]
    assert disk.bytes_of(P.SNAPSHOTS, device="disk") == 4 * P_7B and disk.bytes_of(P.SNAPSHOTS, device="cpu") == 0
    assert disk.bytes_of(P.SNAPSHOT_IN_USE, device="cpu") == 4 * P_7B
    assert disk.device("disk").capacity is None and disk.fits
    in_use = next(p for p in disk.device("cpu").parts if p.kind == P.SNAPSHOT_IN_USE)
    assert in_use.phase == P.SCORING
    assert memory.device("cpu").peak - disk.device("cpu").peak == 4 * P_7B
    assert "disk" in format_plan(disk)


def test_disk_snapshots_are_checked_against_the_free_space_of_the_run_directory(qwen7b):
    """The held version, 4P bytes, on a disk with 2P free: refused before the run starts, naming the key that
    moves the snapshots; with 8P free it fits, and the verdict says how much of the free space it takes."""
    full = Machine(0, 0, None, disk_free=2 * P_7B)
    plan = plan_7b(qwen7b, "oldlogits.source=snapshot", "oldlogits.snapshot_device=disk", machine=full)
    assert plan.device("disk").capacity == 2 * P_7B and plan.device("disk").overflow == 2 * P_7B
    assert not plan.fits and plan_error(plan).field == plan.device("disk").parts[0].key
    assert f"disk needs {4 * P_7B:,} bytes" in verdict(plan)
    roomy = Machine(0, 0, None, disk_free=8 * P_7B)
    assert plan_7b(qwen7b, "oldlogits.source=snapshot", "oldlogits.snapshot_device=disk", machine=roomy).fits


def test_a_resumed_run_counts_the_snapshot_files_its_store_will_remove_as_free(tmp_path, monkeypatch):
    monkeypatch.setattr(P.shutil, "disk_usage", lambda path: SimpleNamespace(total=10**6, used=10**6 - 60, free=60))
    left = tmp_path / "run" / "snapshots" / "rank0-1234"
    left.mkdir(parents=True)
    (left / "version_7.pt").write_bytes(b"x" * 100)
    assert P.this_machine(tmp_path / "run").disk_free == 160
    assert P.this_machine(tmp_path / "fresh").disk_free == 60 and P.this_machine().disk_free is None


def test_free_disk_asks_the_nearest_folder_that_exists(tmp_path, monkeypatch):
    asked = []

    def disk_usage(path):
        asked.append(path)
        return SimpleNamespace(total=100, used=40, free=60)

    monkeypatch.setattr(P.shutil, "disk_usage", disk_usage)
    assert P.free_disk(tmp_path / "runs" / "not-yet") == 60  # the run directory is made after its plan
    assert asked == [tmp_path]


def test_planned_config_keeps_device_names_of_another_machine():
    # this machine has no GPU: load_config refuses cuda:3, a plan for another machine takes it
    cfg = planned_config(None, ["trainer.device=cuda:3", "oldlogits.snapshot_device=cpu"])
    assert (cfg.trainer.device, cfg.oldlogits.snapshot_device, cfg.runtime.backend) == ("cuda:3", "cpu", "embedded")
    with pytest.raises(ConfigError, match="trainer.device"):
        planned_config(None, ["trainer.device=gpu0"])


# --------------------------------------------------------------------------- `twofold plan`


def test_plan_command_exit_codes(qwen7b, capsys):
    common = [f"model.path={qwen7b}", "model.warmstart=false", "oldlogits.source=snapshot", "trainer.device=cuda:0"]
    machine = ["--gpus", "1", "--gpu-memory", "80GiB", "--host-memory", "1TiB"]
    assert main(["plan", *common, *machine]) == 1
    out, err = capsys.readouterr()
    assert "DOES NOT FIT: 87,410,338,124 bytes" in out
    assert err.count("\n") == 1 and "87,410,338,124 bytes (81.4 GiB) over" in err  # the overflow, one line
    assert main(["plan", *common, "model.lora.r=16", *machine]) == 0
    assert "fits: cuda:0 49.3 GiB of 80.0 GiB" in capsys.readouterr().out
    assert main(["plan", *common, "--gpu-memory", "lots"]) == 2  # a size it cannot read: a config error
    assert "--gpu-memory" in capsys.readouterr().err
    # the held 7B version on disk, 4P = 28.4 GiB, against 10 GiB free: refused, naming the disk
    cpu = [f"model.path={qwen7b}", "model.warmstart=false", "oldlogits.source=snapshot"]
    disk = [*cpu, "trainer.device=cpu", "oldlogits.snapshot_device=disk", "--gpus", "0"]
    assert main(["plan", *disk, "--disk-free", "10GiB"]) == 1
    out, err = capsys.readouterr()
    assert "10.0 GiB free on disk" in out and "disk needs" in err


# --------------------------------------------------------------------------- against a measured run


@pytest.mark.parametrize(
    ("source", "mode", "lora"),
    [
        ("ewma", "sync", False),
        ("snapshot", "sync", False),
        ("dedicated", "sync", False),
        ("snapshot", "async", False),  # one version held through each update
        ("snapshot", "async", True),  # a version is its adapters
        ("ewma", "async", True),
        ("dedicated", "async", True),  # the copy shares the trainer's frozen base
    ],
)
def test_plan_is_within_15_percent_of_a_measured_run(tmp_path, tiny_path, source, mode, lora):
    """Two steps of the tiny model on the CPU: the memory/* metrics against the plan's parts."""
    from twofold.pipeline.loop import Pipeline
    from twofold.pipeline.rundir import read_metrics

    overrides = {"trainer.steps": 2, "oldlogits.source": source, "run.checkpoint_every": 0, "run.tensorboard": False}
    if lora:
        overrides["model.lora"] = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}
    cfg = small_config(mode=mode, **overrides)
    Pipeline(cfg, tmp_path / "run", model_path=tiny_path).run()
    row = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    here = P.this_machine()  # whether this CPU multiplies bf16 natively decides the engine's bytes
    plan = memory_plan(cfg, read_model_shapes(tiny_path), Machine(0, 0, None, host_bf16_matmul=here.host_bf16_matmul))
    pairs = {
        "memory/trainer_parameter_bytes": plan.bytes_of(P.TRAINER_WEIGHTS),
        "memory/trainer_gradient_bytes": plan.bytes_of(P.GRADIENTS),
        "memory/optimizer_state_bytes": plan.bytes_of(P.OPTIMIZER_STATE),
        "memory/engine_weight_bytes": plan.bytes_of(P.ENGINE_WEIGHTS),
        # sync mode holds no snapshot version (its tokens are scored before the update), as planned
        "memory/oldlogit_peak_bytes": plan.bytes_of(*P.OLDLOGIT_STATE),
    }
    for metric, planned in pairs.items():
        assert planned == pytest.approx(row[metric], rel=0.15), metric
    assert (row["memory/oldlogit_peak_bytes"] == 0) == (source == "snapshot" and mode == "sync")


def test_a_host_engine_without_native_bf16_holds_float32_weights(tiny_path):
    """The built-in bf16 engine on a CPU without bf16 matmul holds bf16 values in float32: 4 bytes per weight."""
    cfg = small_config(**{"engine.dtype": "bfloat16", "engine.prefix_cache": "3MiB"})
    shapes = read_model_shapes(tiny_path)
    native = memory_plan(cfg, shapes, Machine(0, 0, None, host_bf16_matmul=True))
    emulated = memory_plan(cfg, shapes, Machine(0, 0, None, host_bf16_matmul=False))
    base = native.counts.base
    assert native.bytes_of(P.ENGINE_WEIGHTS) == 2 * base and emulated.bytes_of(P.ENGINE_WEIGHTS) == 4 * base
    assert native.bytes_of(P.ENGINE_PREFIX_CACHE) == 3 * 2**20  # its bound, whatever the device


# --------------------------------------------------------------------------- at train start


def test_train_refuses_a_run_larger_than_this_machine_before_building_it(tmp_path, tiny_path, monkeypatch):
    from twofold.pipeline.train import train

    asked = []

    def machine(run_dir=None):
        asked.append(run_dir)
        return Machine(0, 0, host_memory=2**20)  # 1 MiB of RAM

    monkeypatch.setattr(P, "this_machine", machine)
    cfg = small_config(**{"model.path": str(tiny_path)})
    with pytest.raises(ConfigError, match=r"does not fit: cpu needs [\d,]+ bytes .* of 1.0 MiB"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert asked == [tmp_path / "run"]  # whose disk would hold disk snapshots


def test_the_plan_of_a_run_on_this_cpu_is_logged_and_fits(tiny_path, caplog):
    cfg = load_config(None, [f"model.path={tiny_path}", "model.warmstart=false", "trainer.device=cpu"])
    with caplog.at_level("INFO", logger="twofold.pipeline.plan"):
        plan = P.check_memory_plan(cfg, tiny_path)
    assert plan.fits and "memory plan: " in caplog.text


# --------------------------------------------------------------------------- vLLM placement (issue 35, item 8)


def test_vllm_on_its_own_gpu_takes_its_share_there_not_beside_the_trainer(qwen7b):
    lora = ["model.lora.r=16", "trainer.device=cuda:0", "engine.backend=vllm"]
    plan = plan_7b(qwen7b, *lora, "engine.device=cuda:1", machine=Machine(2, 80 * GIB, 2**40))
    # int(0.9 x 80 GiB) = 77,309,411,328 on GPU 1; GPU 0 keeps the trainer alone
    assert plan.bytes_of(P.VLLM_SHARE, device="cuda:1") == 77_309_411_328
    assert plan.bytes_of(P.VLLM_SHARE, device="cuda:0") == 0
    assert plan.fits  # beside the trainer (the default, GPU 0) the same share did not: see the README test above


def test_vllm_tensor_parallel_takes_a_share_of_each_of_its_gpus(qwen7b):
    over = ["engine.backend=vllm", "engine.device=cuda:2", "engine.tensor_parallel_size=2", "model.lora.r=16"]
    plan = plan_7b(qwen7b, *over, "engine.gpu_memory_utilization=0.5", machine=Machine(4, 80 * GIB, 2**40))
    assert [plan.bytes_of(P.VLLM_SHARE, device=f"cuda:{g}") for g in range(4)] == [0, 0, 40 * GIB, 40 * GIB]
    assert "1/2 of the weights 14.2 GiB" in format_plan(plan)
    beyond = plan_7b(qwen7b, *over[:1], "engine.device=cuda:3", *over[2:], machine=Machine(4, 80 * GIB, 2**40))
    assert [p.key for p in beyond.problems] == ["engine.device"]
    assert "needs GPUs 3-4; the machine has 4" in beyond.problems[0].message


def test_tensor_parallelism_is_refused_for_the_builtin_engine():
    with pytest.raises(ConfigError, match="engine.tensor_parallel_size"):
        planned_config(None, ["engine.tensor_parallel_size=2"])


def test_the_engine_process_sees_exactly_its_gpus():
    from twofold.engine.placement import visible_devices

    assert visible_devices([2, 3], {}) == "2,3"
    assert visible_devices([1, 2], {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}) == "5,6"  # this process sees 4-7
    with pytest.raises(ConfigError, match="engine.device.*shows 1"):
        visible_devices([1], {"CUDA_VISIBLE_DEVICES": "0"})


# --------------------------------------------------------------------------- an engine that sleeps between steps


SLEEPY_7B = ["mode=sync", "trainer.device=cuda:0", "engine.backend=vllm", "model.lora.r=16", "model.lora.alpha=32",
             "trainer.max_tokens_per_microbatch=8192", "engine.gpu_memory_utilization=0.64"]  # fmt: skip


def test_vllm_that_sleeps_holds_its_share_only_while_generating(qwen7b):
    """7B LoRA in sync mode, vLLM on the trainer's GPU at a 0.64 share. Always: weights 30,502,836,224 + AdamW
    80,741,248 + EWMA average 40,370,176 = 30,623,947,648; the share int(0.64 x 80 GiB) = 54,975,581,388; the
    largest phase, publishing over ipc: packed buffers and weights, 4,359,979,008, and one merged weight
    154,140,672. Awake, the share is always held: 90,113,648,716, over 80 GiB (85,899,345,920) by 4,214,302,796.
    Asleep, it is a phase of its own and the largest: 30,623,947,648 + 54,975,581,388 = 85,599,529,036, which
    fits; publishing wakes the bfloat16 weights alone, 2P = 15,231,233,024, beside the send's 4,514,119,680:
    19,745,352,704."""
    awake = plan_7b(qwen7b, *SLEEPY_7B, "engine.sleep=false", config="configs/frozenlake.yaml")
    assert awake.device("cuda:0").peak == 90_113_648_716 and awake.device("cuda:0").overflow == 4_214_302_796
    asleep = plan_7b(qwen7b, *SLEEPY_7B, "engine.sleep=true", config="configs/frozenlake.yaml")
    gpu = asleep.device("cuda:0")
    assert {p.phase for p in gpu.parts if p.kind == P.VLLM_SHARE} == {P.GENERATION}
    assert gpu.held(P.GENERATION) == 54_975_581_388 and gpu.peak == 85_599_529_036 and asleep.fits
    assert asleep.bytes_of(P.ENGINE_WEIGHTS_WOKEN, device="cuda:0") == 2 * P_7B
    assert gpu.held(P.PUBLISH) == 19_745_352_704
    assert "the engine sleeps between steps" in format_plan(asleep)
    assert "the engine sleeps" not in format_plan(awake)


def test_an_empty_engine_sleep_turns_on_only_where_the_run_fits_only_with_it(qwen7b):
    auto = plan_7b(qwen7b, *SLEEPY_7B, config="configs/frozenlake.yaml")
    assert auto.engine_sleeps and auto.fits
    roomy = plan_7b(qwen7b, *SLEEPY_7B, "engine.gpu_memory_utilization=0.4", config="configs/frozenlake.yaml")
    assert not roomy.engine_sleeps and roomy.fits  # fits awake (69,497,805,696): no reason to sleep
    hopeless = plan_7b(qwen7b, *SLEEPY_7B, "engine.gpu_memory_utilization=0.9", config="configs/frozenlake.yaml")
    assert not hopeless.engine_sleeps and not hopeless.fits  # the share beside the trainer's weights alone overflows
    # vLLM on a GPU of its own frees none of the trainer's by sleeping; async mode generates while it trains
    apart = plan_7b(qwen7b, *SLEEPY_7B, "engine.device=cuda:1", machine=Machine(2, 80 * GIB, 2**40))
    assert not apart.engine_sleeps
    # an explicit engine.sleep=true there is refused before anything loads, and so is vLLM's CPU build's
    mine = plan_7b(qwen7b, *SLEEPY_7B, "engine.sleep=true", "engine.device=cuda:1", machine=Machine(2, 80 * GIB, 2**40))
    assert not mine.engine_sleeps and [p.key for p in mine.problems] == ["engine.sleep"]
    cpu = plan_7b(qwen7b, "mode=sync", "engine.backend=vllm", "engine.sleep=true", machine=Machine(0, 0, None))
    assert [p.key for p in cpu.problems] == ["engine.sleep"] and "engine sleeps" not in format_plan(cpu)
    cfg = planned_config("configs/frozenlake.yaml", [f"model.path={qwen7b}", "model.warmstart=false", *SLEEPY_7B])
    assert P.can_sleep(cfg, ONE_GPU)
    cfg.mode = "async"
    assert not P.can_sleep(cfg, ONE_GPU)


def test_a_builtin_engine_that_sleeps_holds_weights_and_kv_only_while_generating(qwen7b):
    """On a CPU machine with native bf16: the built-in engine's bfloat16 weights, 2P, and its KV cache move from
    `always` to `generation`; publishing allocates the weights again (2P) beside the streamed tensors."""
    machine = Machine(0, 0, None)
    awake = plan_7b(qwen7b, "mode=sync", machine=machine)
    asleep = plan_7b(qwen7b, "mode=sync", "engine.sleep=true", machine=machine)
    host = asleep.device("cpu")
    kinds = {P.ENGINE_WEIGHTS, P.ENGINE_KV_CACHE, P.ENGINE_PREFIX_CACHE}
    assert {p.phase for p in host.parts if p.kind in kinds} == {P.GENERATION}
    assert asleep.bytes_of(P.ENGINE_WEIGHTS) == awake.bytes_of(P.ENGINE_WEIGHTS) == 2 * P_7B
    assert asleep.bytes_of(P.ENGINE_WEIGHTS_WOKEN) == 2 * P_7B
    engine = sum(p.nbytes for p in host.parts if p.kind in kinds)
    assert host.held(P.ALWAYS) == awake.device("cpu").held(P.ALWAYS) - engine
    assert host.peak < awake.device("cpu").peak
