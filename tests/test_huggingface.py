"""Hugging Face interop (checkpoints.huggingface, checkpoints.sources): a Llama imported at
TP=1, TP=2 and PP=2 gives transformers' own logits; an export loads in transformers with
the project's logits and imports back bitwise; every mistake is one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from checkpoints import CheckpointError
from checkpoints.huggingface import HFLlama
from checkpoints.import_hf import hf_overrides
from checkpoints.sharded import load_model_weights
from checkpoints.sources import open_weights
from data_prep.tokenizer import Tokenizer
from megatron_transfusion.config import ConfigError, UserError, load_config
from megatron_transfusion.model import build_model
from tests.conftest import ROOT, run_torchrun
from tests.distributed.hf_worker import text_batch
from tests.hf_models import VOCAB, hf_logits, save_tiny_llama, save_tokenizer
from tests.test_reliability import assert_one_line_error

PATCH_LAYERS = {
    "patch_in.proj.bias",
    "patch_in.proj.weight",
    "patch_in.timestep_embedding.mlp.0.bias",
    "patch_in.timestep_embedding.mlp.0.weight",
    "patch_in.timestep_embedding.mlp.2.bias",
    "patch_in.timestep_embedding.mlp.2.weight",
    "patch_out.proj.bias",
    "patch_out.proj.weight",
}
TOKENS = torch.randint(5, VOCAB - 6, (2, 40), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """GQA with tied embeddings and its own tokenizer; MHA with untied ones."""
    root = tmp_path_factory.mktemp("llamas")
    gqa = save_tiny_llama(root / "gqa", "gqa")
    save_tokenizer(gqa)
    return {"gqa": gqa, "mha": save_tiny_llama(root / "mha", "mha")}


def our_logits(model, cfg, tokens=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(text_batch(tokens, cfg)).logits.transpose(0, 1)


def imported(directory, *overrides):
    cfg = load_config("tiny", [*hf_overrides(HFLlama(directory)), *overrides])
    (model,) = build_model(cfg, _platform())
    return model, cfg


def _platform():
    from megatron_transfusion import platform

    return platform.current()


@pytest.mark.parametrize("kind", ["gqa", "mha"])
def test_import_gives_transformers_logits_at_tp1(megatron_world, llamas, kind):
    model, cfg = imported(llamas[kind], "model.attention_backend=sdpa")
    fresh = open_weights(f"hf:{llamas[kind]}").load([model], cfg.model)
    assert set(fresh) == PATCH_LAYERS  # a language model has no patch layers
    ours = our_logits(model, cfg)
    torch.testing.assert_close(
        ours[..., :VOCAB], hf_logits(llamas[kind], TOKENS), rtol=0, atol=1e-5
    )
    # The rows the Hugging Face vocabulary lacks start as its mean embedding.
    embedding = model.embedding.word_embeddings.weight
    hf = HFLlama(llamas[kind]).tensor("model.embed_tokens.weight")
    assert embedding.shape[0] > hf.shape[0]
    torch.testing.assert_close(embedding[-1], hf.mean(0))


@pytest.mark.parametrize("layout", [["--tp", "2"], ["--pp", "2"]], ids=["tp2", "pp2"])
def test_import_gives_transformers_logits_at_tp2_and_pp2(llamas, tmp_path, layout):
    out = tmp_path / "logits.safetensors"
    run_torchrun(
        "tests/distributed/hf_worker.py",
        2,
        str(out),
        *layout,
        str(llamas["gqa"]),
        str(llamas["mha"]),
    )
    saved = load_file(out)
    for i, kind in enumerate(["gqa", "mha"]):
        reference = hf_logits(llamas[kind], saved[f"tokens{i}"])
        torch.testing.assert_close(saved[f"logits{i}"][..., :VOCAB], reference, rtol=0, atol=1e-5)


def test_llama3_rope_scaling_imports(megatron_world, tmp_path):
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    directory = save_tiny_llama(tmp_path / "llama31", "gqa", rope_scaling=scaling)
    model, cfg = imported(directory, "model.attention_backend=sdpa")
    assert cfg.model.rope_scaling_factor == 8.0
    open_weights(f"hf:{directory}").load([model], cfg.model)
    tokens = torch.randint(5, VOCAB, (1, 200), generator=torch.Generator().manual_seed(4))
    ours = our_logits(model, cfg, tokens)[..., :VOCAB]
    torch.testing.assert_close(ours, hf_logits(directory, tokens), rtol=0, atol=1e-5)


def mtf_checkpoint(*args):
    return subprocess.run(
        [sys.executable, "-m", "checkpoints.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


@pytest.fixture(scope="module")
def exported(llamas, tmp_path_factory):
    """import-hf of the GQA Llama -> a run; that run exported as a Hugging Face directory
    in several weight files; the export imported again."""
    root = tmp_path_factory.mktemp("export")
    for args in (
        ["import-hf", llamas["gqa"], "--out", root / "run", "diffusion.loss_weight=3.0"],
        ["export", root / "run", "--format", "hf", "--out", root / "hf", "--max-shard-gib", 1e-4],
        ["import-hf", root / "hf", "--out", root / "again"],
    ):
        result = mtf_checkpoint(*args)
        assert result.returncode == 0, result.stderr[-4000:]
    return root


def test_export_loads_in_transformers_with_the_projects_logits(megatron_world, llamas, exported):
    cfg = load_config(str(exported / "run" / "config.yaml"), ["model.attention_backend=sdpa"])
    (model,) = build_model(cfg, _platform())
    load_model_weights([model], exported / "run" / "checkpoints" / "step_00000000")
    assert len(list((exported / "hf").glob("model-*-of-*.safetensors"))) > 1  # with an index
    torch.testing.assert_close(
        hf_logits(exported / "hf", TOKENS), our_logits(model, cfg), rtol=0, atol=1e-5
    )
    # transformers' tokenizer of the export: the run's ids, its specials included.
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(exported / "hf")
    run_tokenizer = Tokenizer.load(llamas["gqa"])
    text = "a red cat is left of a cup"
    assert theirs.encode(text, add_special_tokens=False) == run_tokenizer.encode(text)
    assert Tokenizer.load(exported / "hf").special == run_tokenizer.special
    assert theirs.convert_tokens_to_ids("<boi>") == run_tokenizer.special.boi


def test_export_round_trips_bitwise(megatron_world, exported):
    cfg = load_config(str(exported / "run" / "config.yaml"))
    original, again, from_export = (build_model(cfg, _platform())[0] for _ in range(3))
    load_model_weights([original], exported / "run" / "checkpoints" / "step_00000000")
    load_model_weights([again], exported / "again" / "checkpoints" / "step_00000000")
    assert open_weights(exported / "hf").load([from_export], cfg.model) == []  # patch layers too
    for model in (again, from_export):
        for (name, a), b in zip(original.state_dict().items(), model.state_dict().values()):
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b), name
    # The import of the export keeps the run's whole config, not only config.json's fields.
    again = load_config(str(exported / "again" / "config.yaml"))
    assert again.diffusion.loss_weight == 3.0 and again.model == cfg.model


def test_hf_tokenizer_keeps_the_models_own_document_tokens(tmp_path):
    save_tokenizer(tmp_path, llama3_roles=True)
    tokenizer = Tokenizer.load(tmp_path)
    backend = tokenizer._backend
    assert tokenizer.special.bos == backend.token_to_id("<|begin_of_text|>")
    assert tokenizer.special.eos == backend.token_to_id("<|end_of_text|>")
    assert tokenizer.special.boi == backend.token_to_id("<boi>")


# ---- Mistakes are one line ----------------------------------------------------------------


def test_unsupported_or_broken_directories_are_refused(llamas, tmp_path):
    assert_one_line_error(
        mtf_checkpoint("import-hf", tmp_path / "nope", "--out", tmp_path / "r"), "nope"
    )

    def variant(name, change=None, drop=()):
        directory = tmp_path / name
        shutil.copytree(llamas["mha"], directory)
        config = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps({**config, **(change or {})}))
        for file in drop:
            (directory / file).unlink()
        return directory

    cases = {
        variant(
            "qwen", {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}
        ): "Qwen2ForCausalLM",
        variant("bias", {"attention_bias": True}): "attention_bias",
        variant("rope", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}): "rope_scaling",
        variant("nobin", drop=[p.name for p in llamas["mha"].glob("*.safetensors*")]): "neither",
    }
    for directory, message in cases.items():
        with pytest.raises(CheckpointError, match=message) as error:
            HFLlama(directory)
        assert "\n" not in str(error.value)
    # config.json that disagrees with its tensors: the shape is named
    wide = variant("wide", {"intermediate_size": 256})
    with pytest.raises(UserError, match="mlp.linear_fc1.weight' has shape"):
        open_weights(f"hf:{wide}").load(*imported_cpu(wide))


def imported_cpu(directory):
    model, cfg = imported(directory)
    return [model], cfg.model


def test_config_that_disagrees_with_config_json_is_refused(megatron_world, llamas):
    hf = HFLlama(llamas["gqa"])
    cfg = load_config("tiny", [*hf_overrides(hf), "model.num_query_groups=4"])
    with pytest.raises(ConfigError, match="'model.num_query_groups' is 4, but .* gives 2"):
        hf.check(cfg.model)
    cfg = load_config(
        "tiny", [*hf_overrides(hf), "model.vocab_size=100", "model.make_vocab_size_divisible_by=1"]
    )
    with pytest.raises(ConfigError, match="vocab_size=300"):
        hf.check(cfg.model)


def test_pickled_weights_are_never_loaded(llamas, tmp_path):
    directory = tmp_path / "pickled"
    directory.mkdir()
    shutil.copy(llamas["mha"] / "config.json", directory)
    torch.save({"model.embed_tokens.weight": torch.zeros(2)}, directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: pickles, which are never loaded"):
        HFLlama(directory)


def test_inspect_reads_a_hugging_face_export(exported):
    result = mtf_checkpoint("inspect", exported / "hf")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        '"exported": "hf"' in result.stdout
        and "model.layers.3.mlp.gate_proj.weight" in result.stdout
    )
    assert "patch_out.proj.weight" in result.stdout


def test_export_refuses_to_overwrite(exported):
    result = mtf_checkpoint("export", exported / "run", "--format", "hf", "--out", exported / "hf")
    assert_one_line_error(result, "already exists")
    with safe_open(str(exported / "hf" / "transfusion.safetensors"), "pt") as f:
        assert set(f.keys()) == PATCH_LAYERS
