"""Growing the Shapes UNet: attention added at a new resolution starts as an exact no-op, then trains."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from pipelines.loading import EMBEDDED_MODEL
from studio.shapes.model import unet_config
from studio.shapes.train import grow_unet, main


def _trained_two_level_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config(attention_levels=2))
    with torch.no_grad():  # every weight non-trivial, as after training (zero-init layers included)
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return unet.eval()


def test_the_default_layout_is_the_shipped_unets():
    """`studio shapes train` with its defaults rebuilds the architecture that ships in assets/."""
    shipped = UNet2DConditionModel.load_config(EMBEDDED_MODEL / "unet")
    default = UNet2DConditionModel(**unet_config()).config
    assert {k: default[k] for k in shipped if not k.startswith("_")} == {
        k: tuple(v) if isinstance(v, list) else v for k, v in shipped.items() if not k.startswith("_")}
    assert unet_config(3)["down_block_types"][0] == "CrossAttnDownBlock2D" != shipped["down_block_types"][0]


def test_grown_unet_starts_out_computing_what_the_trained_one_did():
    trained = _trained_two_level_unet()
    grown = UNet2DConditionModel(**unet_config(attention_levels=3)).eval()
    grow_unet(grown, trained, log=lambda msg: None)
    assert grown.config.down_block_types[0] == "CrossAttnDownBlock2D"
    x, text = torch.randn(2, 4, 16, 16), torch.randn(2, 32, 64)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        assert torch.equal(grown(x, t, text).sample, trained(x, t, text).sample)

    # The added blocks learn: their zeroed output projection gets a gradient from the first step.
    grown(x, t, text).sample.square().mean().backward()
    new_proj = grown.down_blocks[0].attentions[0].proj_out
    assert new_proj.weight.grad is not None and new_proj.weight.grad.abs().sum() > 0


def test_growing_to_fewer_attention_levels_is_refused():
    three = UNet2DConditionModel(**unet_config(attention_levels=3))
    with pytest.raises(ValueError, match="do not fit this layout.*--attention-levels"):
        grow_unet(UNet2DConditionModel(**unet_config(attention_levels=2)), three, log=lambda msg: None)


def test_a_unet_init_folder_without_a_model_is_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "run"), "--attention-levels", "3", "--unet-init", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no unet/config.json there" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing started
