"""trl-ltc: teachability-aware on-policy distillation for Hugging Face TRL.

The trainer and config are imported lazily so that the pure-math modules (`trl_ltc.release`,
`trl_ltc.segmentation`) load without importing TRL.
"""

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "TeachabilityGKDConfig": "trl_ltc.config",
    "TeachabilityGKDTrainer": "trl_ltc.trainer",
    "token_signals": "trl_ltc.signals",
    "TokenSignals": "trl_ltc.signals",
    "segment_completions": "trl_ltc.segmentation",
    "TeacherServerError": "trl_ltc.teacher_server",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    from .config import TeachabilityGKDConfig
    from .segmentation import segment_completions
    from .signals import TokenSignals, token_signals
    from .teacher_server import TeacherServerError
    from .trainer import TeachabilityGKDTrainer


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'trl_ltc' has no attribute {name!r}")
