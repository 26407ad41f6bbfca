"""Memory-saving optimizers: 8-bit block-wise AdamW and paged (host-resident) states, by recipe name.

Use :func:`build_optimizer` with a recipe's ``train.optimizer``: ``adamw``, ``adamw_8bit``, ``paged_adamw``,
``paged_adamw_8bit``. All four save and resume exactly through :mod:`lorakit.checkpoint`.
"""

from lorakit.optim.adamw8bit import AdamW8bit
from lorakit.optim.factory import OPTIMIZERS, build_optimizer
from lorakit.optim.paged import PagedAdamW, PagedAdamW8bit

__all__ = ["OPTIMIZERS", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "build_optimizer"]
