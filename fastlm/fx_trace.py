"""fastlm's layers and functional ops under ``torch.fx.symbolic_trace``: one node each, as torch's are.

FX's tracer records a module from ``torch.nn`` as one ``call_module`` node, and a torch function as one
``call_function`` node, and runs anything else on proxies. fastlm's modules and functionals check their input
(dims, dtypes, id ranges) and count batches, which proxies cannot do, so a model using them (a converted model,
say) would not trace where the same model written with torch does. ``traced_as_leaf`` (for a module's forward)
and ``traced_as_call`` (for a functional) make a call that receives a proxy record itself as torch's are recorded;
the traced graph then calls the module or function, which runs on real tensors.
"""

from __future__ import annotations

import functools

from torch import fx


def first_proxy(args: tuple, kwargs: dict) -> fx.Proxy | None:
    for value in (*args, *kwargs.values()) if kwargs else args:  # a loop: this runs on every training step
        if isinstance(value, fx.Proxy):
            return value
    return None


def traced_as_leaf(forward):
    """Decorates a module's ``forward``: called with an FX proxy among its arguments, it adds a ``call_module``
    node for the module to the proxy's graph and returns that node's proxy. The module traced itself (the
    tracer's root) runs its forward on the proxies, as a torch module there does."""

    @functools.wraps(forward)
    def recorded_or_run(module, *args, **kwargs):
        proxy = first_proxy(args, kwargs)
        if proxy is not None and proxy.tracer.root is not module:
            return proxy.tracer.create_proxy("call_module", proxy.tracer.path_of_module(module), args, kwargs)
        return forward(module, *args, **kwargs)

    return recorded_or_run


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
