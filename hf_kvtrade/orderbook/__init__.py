"""Order-book replay of per-order (L3) event streams: strict readers, an L2 book, features on a fixed clock."""

from .book import OrderBook
from .events import read_orders, read_trades
from .features import CLOCK_MS, TickClock, features, ofi_term

__all__ = ["CLOCK_MS", "OrderBook", "TickClock", "features", "ofi_term", "read_orders", "read_trades"]
