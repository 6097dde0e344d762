"""fastlm's modules as leaves of ``torch.fx.symbolic_trace``, as torch's own modules are.

FX's tracer records a module from ``torch.nn`` as one ``call_module`` node and runs any other module's forward
on proxies. fastlm's forwards check their input (dims, dtypes) and count batches, which proxies cannot do, so a
model holding fastlm's layers (a converted model, say) would not trace where the same model with torch's layers
does. ``traced_as_leaf`` makes a forward that receives a proxy record itself as torch's modules are recorded; the
traced graph then calls the module, which runs its forward on real tensors.
"""

from __future__ import annotations

import functools

from torch import fx


def traced_as_leaf(forward):
    """Decorates a module's ``forward``: called with an FX proxy among its arguments, it adds a ``call_module``
    node for the module to the proxy's graph and returns that node's proxy. The module traced itself (the
    tracer's root) runs its forward on the proxies, as a torch module there does."""

    @functools.wraps(forward)
    def recorded_or_run(module, *args, **kwargs):
        for value in (*args, *kwargs.values()) if kwargs else args:  # a loop: this runs on every training step
            if isinstance(value, fx.Proxy) and value.tracer.root is not module:
                return value.tracer.create_proxy("call_module", value.tracer.path_of_module(module), args, kwargs)
        return forward(module, *args, **kwargs)

    return recorded_or_run
