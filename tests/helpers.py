"""Small helpers shared by the tests (shapes only: nothing here computes a result)."""
import jax
import jax.numpy as jnp
import numpy as np


def count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def abstract_variables(model, shape, batch=1, **kw):
    """Variables' shapes from `jax.eval_shape(model.init)`: no memory, no arithmetic."""
    x = jax.ShapeDtypeStruct((batch, *shape), jnp.float32)
    return jax.eval_shape(lambda v: model.init(jax.random.key(0), v, **kw), x)


def quick_variables(model, x, **kw):
    """Variables of the right shapes filled from numpy (fan-in scaled normals, BN
    scale/variance 1, biases/means 0). XLA's compile of a full random `init` costs
    tens of seconds on a 2-core CPU for the ImageNet nets; forward-pass tests only
    need sensible values. `init` itself is covered by the parameter-count tests."""
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda v: model.init(jax.random.key(0), v, **kw), x)

    def fill(path, leaf):
        name = path[-1].key
        if name in ("scale", "var", "coefficient"):
            return jnp.ones(leaf.shape, leaf.dtype)
        if name in ("bias", "mean"):
            return jnp.zeros(leaf.shape, leaf.dtype)
        fan_in = max(1, int(np.prod(leaf.shape[:-1])))
        return jnp.asarray(rng.normal(0, 1 / np.sqrt(fan_in), leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def refused(main, argv, capsys) -> tuple[int, str]:
    """A command line refused before it computes anything, run in this process (no
    interpreter or JAX start-up): its exit status and what it wrote to stderr."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's refusals
        code = e.code
    return code, capsys.readouterr().err
