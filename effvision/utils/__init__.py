from .checkpoint import (
    CheckpointError,
    allow_mmengine_checkpoints,
    describe_key_mismatch,
    extract_state_dict,
    load_checkpoint_file,
)
from .errors import close_type_names, explain_unknown_type
from .setup_env import register_all_modules

__all__ = [
    'CheckpointError',
    'allow_mmengine_checkpoints',
    'close_type_names',
    'describe_key_mismatch',
    'explain_unknown_type',
    'extract_state_dict',
    'load_checkpoint_file',
    'register_all_modules',
]
