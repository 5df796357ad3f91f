"""The masked LSTM scan kernel: its custom VJP against autodiff, and the first-step shortcut."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdm_jax.models import scan


def assert_tree_close(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize("initial", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("return_sequences", [False, True])
def test_custom_vjp_scan_matches_autodiff(reverse, return_sequences, initial):
    rng = np.random.default_rng(0)
    t, b, h = 12, 5, 6
    xp = jnp.asarray(rng.normal(size=(t, b, 4 * h)), jnp.float32)
    whh = jnp.asarray(rng.normal(size=(h, 4 * h)) * 0.5, jnp.float32)
    bias = jnp.asarray(rng.normal(size=(4 * h,)), jnp.float32)
    mask = jnp.asarray(np.arange(t)[:, None] >= np.array([0, 3, 7, 11, 1])[None, :])
    out_shape = (t, b, h) if return_sequences else (b, h)
    cot = jnp.asarray(rng.normal(size=out_shape), jnp.float32)
    # The TFT starts the state at its static context; the CNN-BiLSTM at zero.
    h0 = jnp.asarray(rng.normal(size=(b, h)), jnp.float32) if initial else jnp.zeros((b, h))
    c0 = jnp.asarray(rng.normal(size=(b, h)), jnp.float32) if initial else jnp.zeros((b, h))

    def f(custom):
        def loss(xp, whh, bias, h0, c0):
            hs = scan.lstm_scan(
                xp,
                whh,
                bias,
                mask,
                reverse=reverse,
                return_sequences=return_sequences,
                custom_vjp=custom,
                initial=(h0, c0),
            )
            return jnp.sum(hs * cot)

        grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))
        return jax.jit(grad)(xp, whh, bias, h0, c0)

    (l_ref, g_ref), (l_cus, g_cus) = f(False), f(True)
    np.testing.assert_array_equal(np.asarray(l_ref), np.asarray(l_cus))
    assert_tree_close(g_ref, g_cus, rtol=1e-5, atol=1e-6)
    # The initial state gets a gradient (the TFT's static context learns through it).
    assert float(jnp.abs(g_cus[3]).sum()) > 0 and float(jnp.abs(g_cus[4]).sum()) > 0
    # Masked (left-padded) steps get no gradient at all, in either direction.
    assert np.all(np.asarray(g_cus[0])[~np.asarray(mask)] == 0)


def test_backward_direction_shortcut_is_the_reverse_scans_last_output():
    rng = np.random.default_rng(1)
    xp = jnp.asarray(rng.normal(size=(9, 4, 4 * 5)), jnp.float32)
    whh = jnp.asarray(rng.normal(size=(5, 20)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(20,)), jnp.float32)
    mask = jnp.ones((9, 4), bool)
    hs = scan.lstm_scan_reference(xp, whh, bias, mask, reverse=True, return_sequences=True)
    first = scan.first_step(xp[-1] + bias)
    np.testing.assert_allclose(np.asarray(hs[-1]), np.asarray(first), rtol=0, atol=1e-7)
