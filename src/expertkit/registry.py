"""One registry type for every pluggable kind (compositions, routers, merge methods, executors, collaborations).

Extending expertkit is registering a name: a decorator fills the registry when its module is imported. A name
registered twice is a programming error (it would silently replace the first), and an unknown name is the
user's error, answered with the names that exist, taken from the registry itself rather than a list kept by hand.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from expertkit.errors import ExpertkitError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, what: str):
        self.what = what  # "router kind", "merge method" ...: how messages name a member
        self._members: dict[str, T] = {}

    def add(self, name: str, member: T) -> T:
        if name in self._members:
            raise ValueError(f"{self.what} '{name}' is registered twice")
        self._members[name] = member
        return member

    def register(self, name: str, stamp: str | None = None) -> Callable[[T], T]:
        """Decorator: `@REGISTRY.register("name")` adds the decorated object under `name`; with `stamp`, the
        object also gets the name as that attribute (a router class knows its own `kind`)."""

        def add(member: T) -> T:
            self.add(name, member)
            if stamp:
                setattr(member, stamp, name)
            return member

        return add

    def get(self, name: str) -> T:
        """The member registered as `name`; an unknown name is an ExpertkitError listing the known ones."""
        if name not in self._members:
            raise ExpertkitError(f"unknown {self.what} '{name}'; known: {self.listing()}")
        return self._members[name]

    __getitem__ = get

    def names(self) -> list[str]:
        return sorted(self._members)

    def listing(self) -> str:
        """The registered names for help texts and messages: 'a, b or c'."""
        names = self.names()
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._members.items())

    def __contains__(self, name: object) -> bool:
        return name in self._members

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._members)
