"""``@kernel``: Taichi's ``@ti.kernel`` with a cached launch path for torch tensors.

Taichi 1.7.4 prepares every launch in Python: per array argument it re-derives the
compilation key, reads the environment twice (``has_pytorch``), formats the device name and
builds dtype limits. That is about 13 us per array argument on a 2-core CPU (a kernel with 8
tensor arguments: 138 us a launch), and the registration's and training loops' steps launch
5-10 kernels each. :class:`Kernel` keys each call on what the compiled kernel depends on (the
template values, and each tensor's dtype and rank) and, for a key it has seen, fills Taichi's
launch context directly (tensor pointer, byte size, shape; scalars; vector arguments such as
``ti.math.vec3`` element by element) and launches the kernel
Taichi compiled for that key: 24 us for the same 8-argument launch.

Anything else goes through Taichi's own launch unchanged, so its checks and error messages
stay: a key not seen yet (Taichi compiles and validates it, and the key is cached only
after that launch succeeded), tensors that are not contiguous, that need a gradient buffer,
or that live on another device than the backend (Taichi copies those), non-tensor array
arguments, keyword arguments, kernels that return values or print. The cache belongs to
one Taichi program: a new ``ti.init`` starts it afresh.

It uses Taichi internals (the compiled-kernel table and the launch context), so it is on only
for the Taichi version it was written against (:data:`TAICHI_VERSION`, the last release);
``RGS_TAICHI_LAUNCH=taichi`` turns it off. ``tests/test_launch.py`` checks it against
Taichi's own launch.
"""
from __future__ import annotations

import os

import taichi as ti
import torch
from taichi.lang import impl
from taichi.lang.matrix import VectorType
from taichi.types import ndarray_type, primitive_types
from taichi.types.annotations import Template

TAICHI_VERSION = (1, 7, 4)


def enabled() -> bool:
    """Whether :class:`Kernel` uses its cached launch (Taichi version and ``RGS_TAICHI_LAUNCH``)."""
    return (tuple(ti.__version__) == TAICHI_VERSION
            and os.environ.get("RGS_TAICHI_LAUNCH", "cached").strip().lower() != "taichi")


# a vector argument's element slot -> the launch context's setter for one struct member, and the cast
_STRUCT_SETTERS = {"float": ("set_struct_arg_float", float), "int": ("set_struct_arg_int", int),
                   "uint": ("set_struct_arg_uint", int)}


def _scalar_slot(dtype):
    """'float', 'int' or 'uint' for a primitive dtype, else None."""
    if dtype in primitive_types.real_types:
        return "float"
    if dtype in primitive_types.integer_types:
        return "int" if dtype in (ti.i8, ti.i16, ti.i32, ti.i64) else "uint"
    return None


def _slot(annotation):
    """How one argument is passed: 'template', 'array', 'float', 'int', 'uint', a vector
    ``('vector', element slot, length)`` (e.g. ``ti.math.vec3``), or None (not supported by
    the cached launch)."""
    if isinstance(annotation, Template):
        return "template"
    if isinstance(annotation, ndarray_type.NdarrayType):
        dtype = annotation.dtype
        primitive = dtype is None or id(dtype) in primitive_types.type_ids
        return "array" if primitive and annotation.layout == ndarray_type.Layout.AOS else None
    if isinstance(annotation, VectorType):
        element = _scalar_slot(annotation.dtype)
        return None if element is None else ("vector", element, annotation.n)
    return _scalar_slot(annotation)


class Kernel:
    """A Taichi kernel (``ti.kernel(fn)``) called like it, with the cached launch of the
    module docstring. ``taichi`` is the plain Taichi kernel."""

    def __init__(self, fn):
        self.taichi = ti.kernel(fn)
        self.__doc__, self.__name__, self.__wrapped__ = fn.__doc__, fn.__name__, fn
        primal = self.taichi._primal
        self._primal = primal
        self._slots = [_slot(a.annotation) for a in primal.arguments]
        self._usable = (None not in self._slots and primal.return_type is None and not primal.has_print)
        self._enabled = enabled()
        self._prog = None  # the Taichi program the cache belongs to
        self._cache: dict = {}
        self._cuda = False  # whether that program runs on CUDA

    def _key(self, args, cuda: bool):
        """What the compiled kernel depends on, or None when the call must go through Taichi."""
        key = []
        for slot, v in zip(self._slots, args):
            if slot == "array":
                if (type(v) is not torch.Tensor or v.is_cuda != cuda or v.requires_grad
                        or not v.is_contiguous()):
                    return None
                key.append((v.dtype, v.dim()))
            elif slot == "template":
                key.append((type(v), v))
            elif type(slot) is tuple:  # a vector: Taichi checks its length on the first launch
                key.append((type(v), len(v)))
            else:
                key.append(type(v))
        return tuple(key)

    def __call__(self, *args, **kwargs):
        if not (self._usable and self._enabled) or kwargs or len(args) != len(self._slots):
            return self.taichi(*args, **kwargs)
        prog = impl.get_runtime().prog
        if prog is None:  # Taichi not initialised yet: its own launch does that
            return self.taichi(*args)
        if prog is not self._prog:
            self._prog, self._cache, self._cuda = prog, {}, impl.current_cfg().arch == ti.cuda
        key = self._key(args, self._cuda)
        entry = None if key is None else self._cache.get(key)
        if entry is None:
            out = self.taichi(*args)  # compiles and validates; then the key is cached
            if key is not None and key not in self._cache:
                compiled = self._primal.compiled_kernels[self._primal.ensure_compiled(*args)]
                data = prog.compile_kernel(prog.config(), prog.get_device_caps(), compiled)
                self._cache[key] = (compiled, data)
            return out
        compiled, data = entry
        ctx = compiled.make_launch_context()
        index = 0
        for slot, v in zip(self._slots, args):
            if slot == "template":
                continue
            if slot == "array":
                ctx.set_arg_external_array_with_shape((index,), v.data_ptr(), v.element_size() * v.numel(),
                                                      tuple(v.shape), 0)
            elif slot == "float":
                ctx.set_arg_float((index,), float(v))
            elif slot == "int":
                ctx.set_arg_int((index,), int(v))
            elif slot == "uint":
                ctx.set_arg_uint((index,), int(v))
            else:  # a vector: one struct member per element
                name, cast = _STRUCT_SETTERS[slot[1]]
                setter = getattr(ctx, name)
                for i in range(slot[2]):
                    setter((index, i), cast(v[i]))
            index += 1
        prog.launch_kernel(data, ctx)
        return None


def kernel(fn) -> Kernel:
    """Decorator: ``@kernel`` in place of ``@ti.kernel`` (see :class:`Kernel`)."""
    return Kernel(fn)
