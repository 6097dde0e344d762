"""fastlm's layers and functional ops under ``torch.fx.symbolic_trace``: one node each, as torch's are.

FX's tracer records a module from ``torch.nn`` as one ``call_module`` node, and a torch function as one
``call_function`` node, and runs anything else on proxies. fastlm's modules and functionals check their input
(dims, dtypes, id ranges) and count batches, which proxies cannot do, so a model using them (a converted model,
say) would not trace where the same model written with torch does. ``TracedAsLeaf`` (a mixin for modules) and
``traced_as_call`` (a decorator for functionals) make a call that receives a proxy record itself as torch's are
recorded; the traced graph then calls the module or function, which runs on real tensors. The mixin also
answers torch.jit.script, which cannot compile fastlm's modules, with an error that says so.
"""

from __future__ import annotations

import functools

from torch import fx


def first_proxy(args: tuple, kwargs: dict) -> fx.Proxy | None:
    for value in (*args, *kwargs.values()) if kwargs else args:  # a loop: this runs on every training step
        if isinstance(value, fx.Proxy):
            return value
    return None


class TracedAsLeaf:
    """Mixin for fastlm's modules: called with an FX proxy among its arguments, the module adds a ``call_module``
    node for itself to the proxy's graph, as the tracer does for torch's modules, and returns that node's proxy;
    neither its forward nor its hooks run on the proxies (the traced graph runs both, calling the module). A
    module traced itself (the tracer's root) has its forward run on the proxies, as a torch module has."""

    def __call__(self, *args, **kwargs):
        proxy = first_proxy(args, kwargs)
        if proxy is not None:
            return proxy.tracer.create_proxy("call_module", proxy.tracer.path_of_module(self), args, kwargs)
        return super().__call__(*args, **kwargs)

    def __prepare_scriptable__(self):
        """torch.jit.script asks every module of a model this before compiling it. TorchScript cannot compile the
        Python around fastlm's ops (its errors named torch internals, or a module's missing ``_buffers``): say so,
        and what captures such a model instead."""
        raise RuntimeError(f"torch.jit.script cannot compile fastlm's {type(self).__name__} (TorchScript has no "
                           "support for the Python its forward runs); capture the model with torch.compile, "
                           "torch.export or torch.jit.trace instead")


def traced_as_call(function):
    """Decorates a functional op: called with an FX proxy among its arguments, it adds a ``call_function`` node
    for itself to the proxy's graph and returns that node's proxy."""

    @functools.wraps(function)
    def recorded_or_run(*args, **kwargs):
        proxy = first_proxy(args, kwargs)
        if proxy is not None:
            return proxy.tracer.create_proxy("call_function", recorded_or_run, args, kwargs)
        return function(*args, **kwargs)

    return recorded_or_run
