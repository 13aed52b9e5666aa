"""Warehouse inventory: stock levels, reservations and reorder points."""

from __future__ import annotations

import dataclasses
import datetime as dt
from decimal import ROUND_HALF_UP, Decimal


@dataclasses.dataclass
class Item:
    sku: str
    name: str
    unit_price: Decimal
    on_hand: int = 0
    reserved: int = 0
    reorder_point: int = 10

    @property
    def available(self) -> int:
        return self.on_hand - self.reserved


class OutOfStock(Exception):
    pass


class Inventory:
    def __init__(self) -> None:
        self._items: dict[str, Item] = {}
        self._log: list[tuple[dt.datetime, str, str, int]] = []

    def add_item(self, item: Item) -> None:
        if item.sku in self._items:
            raise ValueError(f"duplicate sku {item.sku}")
        self._items[item.sku] = item

    def receive(self, sku: str, qty: int) -> None:
        if qty <= 0:
            raise ValueError("qty must be positive")
        self._items[sku].on_hand += qty
        self._log.append((dt.datetime.now(), "receive", sku, qty))

    def reserve(self, sku: str, qty: int) -> None:
        item = self._items[sku]
        if qty > item.available:
            raise OutOfStock(f"{sku}: want {qty}, have {item.available}")
        item.reserved += qty
        self._log.append((dt.datetime.now(), "reserve", sku, qty))

    def ship(self, sku: str, qty: int) -> None:
        item = self._items[sku]
        if qty > item.reserved:
            raise ValueError(f"{sku}: shipping {qty} but only {item.reserved} reserved")
        item.reserved -= qty
        item.on_hand -= qty
        self._log.append((dt.datetime.now(), "ship", sku, qty))

    def needs_reorder(self) -> list[str]:
        return sorted(s for s, i in self._items.items() if i.available < i.reorder_point)

    def stock_value(self) -> Decimal:
        total = sum(i.unit_price * i.on_hand for i in self._items.values())
        return Decimal(total).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)

    def average_price(self) -> Decimal:
        prices = [i.unit_price for i in self._items.values()]
        return sum(prices) / len(prices)
