"""Every model family, behind one registry (`list_models`, `create_model`, `get_family`).

Importing this package imports each family file, which registers its variants.
The MLP-Mixer names of the earlier single-module API stay here unchanged.
"""
from mixer_jax.models import mixer  # noqa: F401  (registers the family)
from mixer_jax.models import gmixer  # noqa: F401  (registers the family)
from mixer_jax.models import resmlp  # noqa: F401  (registers the family)
from mixer_jax.models import gmlp  # noqa: F401  (registers the family)
from mixer_jax.models import sequencer  # noqa: F401  (registers the family)
from mixer_jax.models import metaformer  # noqa: F401  (registers the MetaFormer families)
from mixer_jax.models.layers import drop_path
from mixer_jax.models.mixer import (BLOCK_PREFIX, MODEL_FIELDS, SCANNED_BLOCKS, VARIANTS,
                                    MixerBlock, MlpBlock, MlpMixer, stack_blocks,
                                    unstack_blocks)
from mixer_jax.models.registry import (Family, Preprocessing, as_variables, create_model,
                                       get_family, init_params, init_variables, list_families,
                                       list_models, param_axes, param_shapes, split_variables,
                                       variable_shapes)

__all__ = [
    "BLOCK_PREFIX", "MODEL_FIELDS", "SCANNED_BLOCKS", "VARIANTS", "Family", "MixerBlock",
    "MlpBlock", "MlpMixer", "Preprocessing", "as_variables", "create_model", "drop_path",
    "get_family", "init_params", "init_variables", "list_families", "list_models",
    "param_axes", "param_shapes", "split_variables", "stack_blocks", "unstack_blocks",
    "variable_shapes",
]
