import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dpar.config import ConfigError, load_config, parse_cli, parse_overrides, save_config, to_dataclass
from dpar.models import ModelConfig, create_model
from dpar.patcher import PatcherConfig
from dpar.validation import ranged

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Schema:
    model: ModelConfig = field(default_factory=ModelConfig)
    patcher: PatcherConfig = field(default_factory=PatcherConfig)
    seed: int = 0
    name: str = "run-${model.gpt_model}"


def write(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_both_override_styles_and_yaml_values(tmp_path):
    path = write(tmp_path, "model:\n  gpt_model: DGPT-L\npatcher:\n  threshold: 8.0\n")
    config = load_config(Schema, path, ["--model.image_size", "384", "patcher.max_patch_length=null",
                                        "--patcher.row_break=false", "--seed", "3"])
    assert config.model.gpt_model == "DGPT-L" and config.model.image_size == 384
    assert config.patcher.threshold == 8.0 and config.patcher.max_patch_length is None
    assert config.patcher.row_break is False and config.seed == 3
    assert config.name == "run-DGPT-L"


def test_override_parsing():
    assert parse_overrides(["--a.b", "1", "c.d=x", "--e=-2", "--f", "-3"]) == ["a.b=1", "c.d=x", "e=-2", "f=-3"]
    with pytest.raises(ConfigError, match="missing value for override --a.b"):
        parse_overrides(["--a.b", "--c", "1"])
    with pytest.raises(ConfigError, match="unexpected argument 'stray'"):
        parse_overrides(["stray"])


def one_line_error(*args) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(Schema, *args)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_key_names_it_and_lists_valid_keys(tmp_path):
    message = one_line_error(None, ["--model.gpt_modl", "DGPT-L"])
    assert "'model.gpt_modl'" in message and "gpt_model, model_type, image_size" in message
    message = one_line_error(write(tmp_path, "modle:\n  x: 1\n"))
    assert "config.yaml" in message and "'modle'" in message and "model, patcher, seed, name" in message


def test_wrong_type_and_bad_choice(tmp_path):
    assert "'model.image_size'" in one_line_error(None, ["model.image_size=big"])
    message = one_line_error(None, ["--patcher.mode", "bytes"])
    assert "'patcher.mode'" in message and "entropy, static, token" in message
    assert "DGPT-XXL" in one_line_error(None, ["--model.gpt_model", "GPT-Z"])


def test_bad_files(tmp_path):
    assert "not found" in one_line_error(tmp_path / "missing.yaml")
    assert "not valid YAML" in one_line_error(write(tmp_path, "model: [unclosed\n"))
    assert "must hold a mapping" in one_line_error(write(tmp_path, "- 1\n- 2\n"))


def test_save_writes_the_resolved_config_atomically(tmp_path):
    config = load_config(Schema, None, ["model.gpt_model=GPT-L"])
    out = tmp_path / "exp" / "config.yaml"
    save_config(config, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["config.yaml"]
    saved = OmegaConf.load(out)
    assert saved.name == "run-GPT-L"
    assert load_config(Schema, out) == config


def test_parse_cli_separates_script_flags():
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument("--prod", action="store_true")
    args, config = parse_cli(parser, Schema, ["--prod", "--model.gpt_model", "DGPT-XL", "seed=5"])
    assert args.prod and args.config is None
    assert config.model.gpt_model == "DGPT-XL" and config.seed == 5


def test_config_builds_the_model():
    config = to_dataclass(load_config(Schema, None, ["model.gpt_model=DPAR-B", "model.rope=2d"]))
    assert isinstance(config.model, ModelConfig)
    import torch
    with torch.device("meta"):
        model = create_model(config.model)
    assert model.config.rope == "2d" and model.block_size == 256


GLOBAL_CONFIGS = sorted(str(p.relative_to(ROOT)) for pattern in ("patching_modes/*.yaml", "baselines/*.yaml",
                                                                   "encoder_decoder/*.yaml", "tiny/global_*.yaml",
                                                                   "tiny/gpt_*.yaml")
                        for p in (ROOT / "configs").glob(pattern))
ENTROPY_CONFIGS = sorted(str(p.relative_to(ROOT)) for pattern in ("entropy_model/*.yaml", "tiny/entropy_model.yaml")
                         for p in (ROOT / "configs").glob(pattern))


@pytest.mark.parametrize("config", GLOBAL_CONFIGS + ENTROPY_CONFIGS)
def test_shipped_training_configs_validate_and_build(config):
    from dpar.training import TrainEntropyConfig, TrainGlobalConfig

    schema = TrainEntropyConfig if config in ENTROPY_CONFIGS else TrainGlobalConfig
    cfg = to_dataclass(load_config(schema, ROOT / config))
    with torch.device("meta"):
        model = create_model(cfg.model)
    assert model.block_size == (cfg.model.image_size // cfg.model.downsample_size) ** 2
    if config.startswith("configs/encoder_decoder/"):  # dgpt_l_e<E>d<D>.yaml builds E encoder and D decoder blocks
        e, d = (int(c) for c in Path(config).stem[-3::2])
        assert (len(model.encoder.layers), len(model.decoder.layers)) == (e, d) and e + d == 5
    assert (cfg.model.model_type == "uncond") == (schema is TrainEntropyConfig)
    assert len(GLOBAL_CONFIGS) >= 10 and len(ENTROPY_CONFIGS) == 3


def test_config_files_inherit_from_their_base(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  gpt_model: DGPT-L\n  image_size: 384\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nmodel:\n  image_size: 256\n")
    config = load_config(Schema, tmp_path / "child.yaml")
    assert config.model.gpt_model == "DGPT-L" and config.model.image_size == 256
    base.write_text("base: child.yaml\n")
    with pytest.raises(ConfigError, match="chain returns to"):
        load_config(Schema, tmp_path / "child.yaml")
    (tmp_path / "orphan.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml \\(the base of"):
        load_config(Schema, tmp_path / "orphan.yaml")


def test_reference_command_reports_a_missing_store_in_one_line():
    proc = subprocess.run([sys.executable, "train_global_model.py", "--config",
                           "configs/patching_modes/global_model_entropy_row_break.yaml", "--model.gpt_model", "DGPT-L",
                           "--patcher.entropy_model_checkpoint_config", "e/config.yaml",
                           "--patcher.entropy_model_checkpoint", "e/checkpoints/epoch_00000299/model.safetensors",
                           "--prod"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr == "error: no token store at data/imagenet256_tokens (missing meta.json); run " \
                          "preprocess_tokens.py --stage tokens first\n"


def test_script_reports_config_errors_in_one_line():
    proc = subprocess.run([sys.executable, "train_global_model.py", "--patcher.treshold", "8"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "'patcher.treshold'" in proc.stderr


def test_missing_mandatory_value_is_named_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "tokenizer.train_vq", "--config", "configs/tokenizer/vq_tiny.yaml"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr == "error: config key 'data.data_path' needs a value (set it in the YAML or with " \
                          "--data.data_path ...)\n"


def test_shipped_tokenizer_configs_validate():
    from tokenizer.train_vq import TrainVQConfig
    from tokenizer.vq_model import create_vq

    for name in ("vq_16", "vq_tiny"):
        config = to_dataclass(load_config(TrainVQConfig, ROOT / "configs" / "tokenizer" / f"{name}.yaml",
                                          ["data.data_path=x"]))
        with torch.device("meta"):
            vq = create_vq(config.model)
        assert vq.downsample == config.model.downsample


# -- one mechanism for the rules between fields: each schema's check(), run by every way a config arrives -------

@dataclass
class Pair:
    low: int = ranged(0, min=0)
    high: int = 1

    def check(self, key=lambda name: name) -> None:
        from dpar.errors import UserError
        if self.low >= self.high:
            raise UserError(f"{key('low')} {self.low} must be below {key('high')} {self.high}")


@dataclass
class Nested:
    pair: Pair = field(default_factory=Pair)
    model: ModelConfig = field(default_factory=ModelConfig)
    limit: int = 10

    def check(self, key=lambda name: name) -> None:  # runs after its sections' own checks
        from dpar.errors import UserError
        if self.pair.high > self.limit:
            raise UserError(f"{key('pair.high')} {self.pair.high} must be at most {key('limit')} {self.limit}")


def check_error(*args) -> str:
    from dpar.errors import UserError
    with pytest.raises(UserError) as info:
        load_config(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_section_check_is_reached_through_load_config_with_full_keys(tmp_path):
    assert check_error(Nested, None, ["pair.low=3", "pair.high=2"]) == "pair.low 3 must be below pair.high 2"
    assert check_error(Nested, write(tmp_path, "pair:\n  high: 11\n")) == "pair.high 11 must be at most limit 10"
    assert check_error(Schema, None, ["--model.image_size", "250"]) == \
        "model.image_size 250 is not a multiple of model.downsample_size 16"
    assert check_error(Schema, None, ["--model.gpt_model", "GPT-B", "--model.rope", "2d"]) == \
        "model.rope applies to DGPT-* models only, not GPT-B"
    load_config(Nested, None, ["pair.high=10"])  # the rules hold: no error
    with pytest.raises(ConfigError, match="'pair.low' must be >= 0; got -1"):  # each field's own rule first
        load_config(Nested, None, ["pair.low=-1", "pair.high=-2"])


def test_a_check_is_reached_through_script_flags():
    import argparse
    from dpar.errors import UserError
    from dpar.validation import check_flags
    with pytest.raises(UserError, match="^model.image_size 250 is not a multiple of model.downsample_size 16$"):
        parse_cli(argparse.ArgumentParser(), Schema, ["--model.image_size", "250"])
    flags = {"image_size": "--image-size", "downsample_size": "--downsample"}
    with pytest.raises(UserError, match="^--image-size 30 is not a multiple of --downsample 4$"):
        check_flags(ModelConfig(image_size=30, downsample_size=4), flags)
    check_flags(ModelConfig(image_size=32, downsample_size=4), flags)


@pytest.mark.parametrize("script,argv,fragment", [
    ("train_global_model", ["--model.image_size", "30"], "model.image_size 30 is not a multiple of model.downsample_size 4"),
    ("train_global_model", ["--model.drop_path_rate", "0.1"], "model.drop_path_rate 0.1 applies to GPT-* models only"),
    ("train_global_model", ["--patcher.mode", "self_entropy"], "patcher.mode self_entropy decides boundaries"),
    ("train_entropy_model", ["--model.gpt_model", "DGPT-tiny"], "model.gpt_model DGPT-tiny: the entropy model is a "
                                                                "token-level GPT-* model"),
    ("train_entropy_model", ["--model.model_type", "c2i"], "model.model_type must be uncond, got 'c2i'"),
    ("tokenizer.train_vq", ["--model.norm_groups", "3", "data.data_path=x"],
     "VQ width model.ch=32 and model.z_channels=64 must be multiples of model.norm_groups=3"),
    ("tokenizer.train_vq", ["--data.image_size", "30", "data.data_path=x"],
     "data.image_size=30 is not a multiple of the tokenizer's downsampling factor 4"),
])
def test_scripts_run_their_schemas_checks_before_any_work(tmp_path, script, argv, fragment):
    import importlib
    from dpar.errors import UserError
    config = {"train_global_model": "configs/tiny/global_model_entropy_row_break.yaml",
              "train_entropy_model": "configs/tiny/entropy_model.yaml",
              "tokenizer.train_vq": "configs/tokenizer/vq_tiny.yaml"}[script]
    out = tmp_path / "runs"
    with pytest.raises(UserError) as info:
        importlib.import_module(script).main(["--config", str(ROOT / config), *argv, f"train.results_dir={out}"])
    assert fragment in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert not out.exists()


def test_a_bad_saved_run_config_is_one_line_naming_the_file(tmp_path):
    from dpar.config import read_section
    from dpar.errors import UserError
    from dpar.runs import load_trained_model
    run = tmp_path / "run"
    (run / "checkpoints" / "epoch_00000000").mkdir(parents=True)
    (run / "checkpoints" / "epoch_00000000" / "model.safetensors").write_bytes(b"")  # never read
    saved = run / "config.yaml"
    saved.write_text("model:\n  gpt_model: GPT-tiny\n  image_size: 32\n  downsample_size: 4\n"
                     "  decoder_injection: residual\n")
    expected = f"in {saved}: model.decoder_injection applies to DGPT-* models only, not GPT-tiny"
    with pytest.raises(ConfigError) as info:
        read_section(saved, "model", ModelConfig)
    assert str(info.value) == expected
    with pytest.raises(UserError) as info:  # before any weights are read
        load_trained_model(run / "checkpoints" / "epoch_00000000" / "model.safetensors")
    assert str(info.value) == expected
    proc = subprocess.run([sys.executable, "sample_c2i.py", "--experiment_dir", str(run),
                           "--output-dir", str(tmp_path / "samples")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "model.decoder_injection applies to DGPT-* models only" in proc.stderr


@pytest.mark.parametrize("gpt_model,recorded,read", [
    # DPAR before the keys existed: a pooling FFN and one injection
    ("DGPT-tiny", "", (True, "once")),
    ("DGPT-tiny", "  encoder_pooling_ffn: false\n  decoder_injection: every_block\n", (False, "every_block")),
    # a GPT-* records DPAR's options without using them: the former defaults read as today's
    ("GPT-tiny", "  encoder_pooling_ffn: true\n  decoder_injection: once\n", (False, "every_block")),
    ("GPT-tiny", "", (False, "every_block")),
])
def test_records_of_earlier_versions_read_as_their_runs_were_trained(tmp_path, gpt_model, recorded, read):
    from dpar.config import load_record, read_section
    from dpar.training import TrainGlobalConfig
    saved = tmp_path / "config.yaml"
    saved.write_text(f"model:\n  gpt_model: {gpt_model}\n  image_size: 32\n  downsample_size: 4\n{recorded}")
    model = read_section(saved, "model", ModelConfig)
    assert (model.encoder_pooling_ffn, model.decoder_injection) == read
    whole = load_record(TrainGlobalConfig, saved).model  # the reading a resume compares with
    assert (whole.encoder_pooling_ffn, whole.decoder_injection) == read


# What the YAML in a file says (text of one value), and what reading it must do: a one-line ConfigError naming the
# file and the key, never a traceback. Each reads the way a training config and a run's config.yaml are read.
UNRESOLVED = [
    ("missing_key", "model:\n  gpt_model: ${model.nope}\n", "'model.gpt_model'"),
    ("unset_env", "model:\n  gpt_model: ${oc.env:DPAR_TEST_NEVER_SET}\n", "DPAR_TEST_NEVER_SET"),
    ("cycle", "model:\n  vocab_size: ${model.num_classes}\n  num_classes: ${model.vocab_size}\n", "Recursive"),
    ("self_cycle", "model:\n  image_size: ${model.image_size}\n", "Recursive"),
    ("unknown_resolver", "model:\n  rope: ${nope:dynamic}\n", "nope"),
    ("bad_grammar", "model:\n  rope: ${model.\n", "'model.rope'"),
    ("not_a_section", "model: 5\n", "'model' must be a section of keys"),
    ("resolves_to_a_wrong_type", "model:\n  gpt_model: DGPT-L\n  image_size: ${model.gpt_model}\n", "'model.image_size'"),
    ("missing_value", "model:\n  image_size: ???\n", "'model.image_size' needs a value"),
]


@pytest.mark.parametrize("text,fragment", [c[1:] for c in UNRESOLVED], ids=[c[0] for c in UNRESOLVED])
def test_a_config_that_does_not_resolve_is_one_line_in_every_reader(tmp_path, text, fragment):
    from dpar.config import read_config_file, read_section
    path = write(tmp_path, text)
    readers = [lambda: read_section(path, "model", ModelConfig)]  # a run's config.yaml
    if "???" not in text:  # in a training config, ??? leaves the schema's default (OmegaConf's merge)
        readers.append(lambda: load_config(Schema, path))
    if "model: 5" not in text and "???" not in text and "${model.gpt_model}" not in text:
        readers.append(lambda: read_config_file(path))  # the raw reader: these fail before any schema
    for read in readers:
        with pytest.raises(ConfigError) as info:
            read()
        message = str(info.value)
        assert "\n" not in message and str(path) in message and fragment in message, message


def test_the_escaped_literal_survives_resolving_saving_and_reading_back(tmp_path):
    from dpar.config import read_config_file, read_section
    path = write(tmp_path, "model:\n  gpt_model: DGPT-L\nname: costs \\${x} and \\\\${seed}\n")
    config = load_config(Schema, path)
    assert config.name == "costs ${x} and \\0"  # OmegaConf's escape: \${ is a literal ${, \\ before ${ a backslash
    saved = tmp_path / "run" / "config.yaml"
    save_config(config, saved)
    assert load_config(Schema, saved).name == config.name  # a run's config.yaml reads back as it was
    assert read_config_file(saved).name == config.name
    assert to_dataclass(load_config(Schema, saved)).name == config.name
    assert read_section(saved, "model", ModelConfig).gpt_model == "DGPT-L"


def test_text_typed_on_the_command_line_is_not_interpolated(tmp_path, monkeypatch):
    monkeypatch.setenv("DPAR_TEST_FOLDER", "elsewhere")
    typed = "tok${oc.env:DPAR_TEST_FOLDER}"
    config = load_config(Schema, None, ["--name", typed, "--model.gpt_model", "DGPT-L"])
    assert config.name == typed and to_dataclass(config).name == typed  # the folder named, not another one
    saved = tmp_path / "config.yaml"
    save_config(config, saved)
    assert load_config(Schema, saved).name == typed
    assert load_config(Schema, None, ["seed=${model.image_size}"]).seed == 256  # a number's ${...} still resolves


BILLION_LAUGHS = "".join(  # under 400 bytes; OmegaConf would copy every shared node: 9^9 strings
    [f"a: &a [{', '.join(['lol'] * 9)}]\n"] +
    [f"{k}: &{k} [{', '.join([f'*{p}'] * 9)}]\n" for p, k in zip("abcdefgh", "bcdefghi")])


def test_yaml_aliases_are_refused_at_once(tmp_path):
    path = write(tmp_path, BILLION_LAUGHS)
    assert len(BILLION_LAUGHS) < 400
    code = ("import sys; from dpar.config import ConfigError, read_config_file\n"
            f"try: read_config_file({str(path)!r})\nexcept ConfigError as e: print(e); sys.exit(2)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "YAML aliases" in proc.stdout and str(path) in proc.stdout, proc.stderr[-2000:]
    message = one_line_error(write(tmp_path, "model: &m\n  gpt_model: DGPT-L\npatcher: *m\n"))
    assert "line 3" in message and "*m" in message


@pytest.mark.parametrize("value", ["2", "0", "1.5"])
def test_a_yes_no_key_given_a_number_is_refused(value):
    """OmegaConf reads train.fsdp=2 (or train.ema=2) as true, so a typo trained sharded, or kept an EMA, in silence."""
    from dpar.training import TrainGlobalConfig
    with pytest.raises(ConfigError, match=rf"config key 'train.fsdp' must be true or false; got {value}$"):
        load_config(TrainGlobalConfig, ROOT / "configs/tiny/gpt_baseline.yaml", [f"train.fsdp={value}"])
    for spelling, expected in (("true", True), ("false", False)):
        config = load_config(TrainGlobalConfig, ROOT / "configs/tiny/gpt_baseline.yaml", [f"train.ema={spelling}"])
        assert config.train.ema is expected
