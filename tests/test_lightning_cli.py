"""HTSRCallback configured from YAML and from the command line through LightningCLI (jsonargparse)."""

from __future__ import annotations

import textwrap

import pytest
from conftest import TinyNet

pytest.importorskip("jsonargparse")
from lightning.pytorch.cli import LightningCLI  # noqa: E402

from lightning_htsr import HTSRCallback  # noqa: E402
from lightning_htsr.training.stopping import StopReason  # noqa: E402


class CLINet(TinyNet):
    """TinyNet with constructor arguments LightningCLI can set."""

    def __init__(self, lr: float = 0.0, heavy: bool = True) -> None:
        super().__init__(lr=lr, heavy=heavy)


def test_callback_from_yaml_config(tmp_path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent(f"""
        trainer:
          default_root_dir: {tmp_path}
          max_epochs: 6
          logger: false
          enable_checkpointing: false
          enable_progress_bar: false
          enable_model_summary: false
          callbacks:
            - class_path: lightning_htsr.HTSRCallback
              init_args:
                every_n_epochs: 1
                layer_types: [linear]
                stop_on: heavy_tailed
                alpha_tolerance: 0.02
                patience: 2
                history_file: from_yaml.csv
                log_figures_every: null
        model:
          lr: 0.0
          heavy: true
        """))
    cli = LightningCLI(CLINet, args=["fit", "--config", str(config)], save_config_kwargs={"overwrite": True})
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, HTSRCallback))
    assert callback.criteria.stop_on == "heavy_tailed" and callback.criteria.patience == 2
    assert callback.layer_types == ["linear"]
    assert callback.criteria.alpha_tolerance == 0.02 and callback.criteria.rule == "settled"
    assert callback.stopping_reason is StopReason.SETTLED
    assert callback.stopped_epoch == 2  # lr = 0: anchored at the end of epoch 0, settled for 2 epochs
    assert callback.history_path.endswith("from_yaml.csv")


def test_callback_from_command_line_arguments(tmp_path) -> None:
    cli = LightningCLI(
        CLINet,
        args=["--trainer.callbacks+=lightning_htsr.HTSRCallback", "--trainer.callbacks.every_n_epochs=2",
              "--trainer.callbacks.stop_on=heavy_tailed", f"--trainer.default_root_dir={tmp_path}",
              "--trainer.logger=false", "--trainer.max_epochs=1"],
        run=False,
    )
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, HTSRCallback))
    assert callback.schedule.every_n_epochs == 2 and callback.criteria.stop_on == "heavy_tailed"


def test_cli_help_comes_from_the_docstring(capsys) -> None:
    with pytest.raises(SystemExit):
        LightningCLI(CLINet, args=["fit", "--trainer.callbacks.help", "lightning_htsr.HTSRCallback"])
    out = capsys.readouterr().out
    assert "--trainer.callbacks.stop_rule" in out and "--trainer.callbacks.alpha_tolerance" in out
    assert "relative change of a matrix's alpha" in out  # from the Google-style Args: section
    assert "heavy_tailed" in out  # the Literal's choices are listed


def test_invalid_phase_name_is_rejected(tmp_path) -> None:
    with pytest.raises(SystemExit):
        LightningCLI(CLINet, args=["--trainer.callbacks+=lightning_htsr.HTSRCallback",
                                   "--trainer.callbacks.stop_on=banana", "--trainer.max_epochs=1"], run=False)
