"""Safe conversion of guided-diffusion PyTorch checkpoints to reddiff-jax checkpoints.

`read_state_dict` reads `.pt`/`.pth` (zip, torch-free, restricted unpickler) and `.safetensors`;
`convert_state_dict` maps the torch keys and layouts to `UNet` params; `convert_file` does both
and writes an orbax checkpoint directory recording the config and the source's sha256.
"""

from reddiff_jax.convert.adm import (
    convert_state_dict,
    expected_torch_shapes,
    flax_path,
    torch_to_flax_layout,
)
from reddiff_jax.convert.files import CONVERTER_VERSION, convert_file, sha256_file
from reddiff_jax.convert.torch_reader import (
    CheckpointFormatError,
    UnsafeCheckpointError,
    read_safetensors,
    read_state_dict,
    read_torch_zip,
)

__all__ = [
    "CONVERTER_VERSION",
    "CheckpointFormatError",
    "UnsafeCheckpointError",
    "convert_file",
    "convert_state_dict",
    "expected_torch_shapes",
    "flax_path",
    "read_safetensors",
    "read_state_dict",
    "read_torch_zip",
    "sha256_file",
    "torch_to_flax_layout",
]
