"""SeqGAN's LSTM language model: the generator, and (with the released weights) the oracle.

Both are the same network (Yu et al., AAAI 2017): embedding → one LSTM layer → linear to the
vocabulary, started from the embedding of token 0 with zero states. The oracle is this network
with the parameters of the paper's ``target_params`` (see ``shared/data/README.md``).
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lit_bigmodel.errors import DataError, MissingPathError

State = tuple[torch.Tensor, torch.Tensor]  # (h, c), each (1, B, H)
_GATES = ("i", "f", "c", "o")  # torch.nn.LSTM's order: input, forget, cell (g), output


class LSTMGenerator(nn.Module):
    """An LSTM language model over fixed-length sequences, started from token ``start_token``.

    Parameters start from N(0, ``init_std``²) (0.1, as the released SeqGAN code; ``None`` keeps
    PyTorch's initialisation). Shapes: tokens ``(B, T)``; ``forward`` returns logits ``(B, T, V)`` where position t predicts
    token t from tokens ``< t`` (teacher forcing).

    Example::

        generator = LSTMGenerator(vocab_size=5000, embedding_dim=32, hidden_dim=32, seq_len=20)
        samples = generator.sample(64)               # (64, 20)
        nll = generator.sequence_nll(samples)        # (64,) per-token mean negative log-likelihood
    """

    def __init__(
        self,
        vocab_size: int = 5000,
        embedding_dim: int = 32,
        hidden_dim: int = 32,
        seq_len: int = 20,
        start_token: int = 0,
        init_std: float | None = 0.1,
    ) -> None:
        super().__init__()
        for name, value in (
            ("vocab_size", vocab_size),
            ("embedding_dim", embedding_dim),
            ("hidden_dim", hidden_dim),
            ("seq_len", seq_len),
        ):
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value!r}.")
        if not 0 <= start_token < vocab_size:
            raise ValueError(f"`start_token` must be in [0, vocab_size), got {start_token!r}.")
        if init_std is not None and not init_std > 0:
            raise ValueError(f"`init_std` must be > 0 or None, got {init_std!r}.")
        self.vocab_size, self.seq_len, self.start_token = vocab_size, seq_len, start_token
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.lstm = nn.LSTM(embedding_dim, hidden_dim, batch_first=True)
        self.output = nn.Linear(hidden_dim, vocab_size)
        if init_std is not None:  # the released SeqGAN code draws every parameter from N(0, 0.1²)
            with torch.no_grad():
                for param in self.parameters():
                    param.normal_(0.0, init_std)
                lstm: Any = self.lstm
                lstm.bias_hh_l0.zero_()  # one bias per gate, as in the paper's cell

    def shifted_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[start, y_1, ..., y_{T-1}]``: the inputs that predict ``tokens`` ``(B, T)``."""
        start = tokens.new_full((tokens.shape[0], 1), self.start_token)
        return torch.cat([start, tokens[:, :-1]], dim=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.lstm(self.embedding(self.shifted_inputs(tokens)))  # (B, T, H)
        return self.output(hidden)  # (B, T, V)

    def prefix_states(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LSTM states after reading ``[start, y_1..y_t]`` for every t: two ``(B, T, H)`` tensors (h, c).

        Index t-1 holds the state whose output predicts token t+1 (t = 1..T).
        """
        embedded = self.embedding(torch.cat([self.shifted_inputs(tokens), tokens[:, -1:]], dim=1))  # (B, T+1, E)
        batch, hidden_dim = tokens.shape[0], self.lstm.hidden_size
        h = embedded.new_zeros(1, batch, hidden_dim)
        c = embedded.new_zeros(1, batch, hidden_dim)
        hs, cs = [], []
        for t in range(embedded.shape[1]):  # T+1 single steps: nn.LSTM returns no per-step cell states
            _, (h, c) = self.lstm(embedded[:, t : t + 1], (h, c))
            hs.append(h[0])
            cs.append(c[0])
        return torch.stack(hs[1:], dim=1), torch.stack(cs[1:], dim=1)

    def step(self, token: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        """One step: read ``token`` ``(B,)``, return next-token logits ``(B, V)`` and the new state."""
        hidden, state = self.lstm(self.embedding(token)[:, None], state)
        return self.output(hidden[:, 0]), state

    @torch.no_grad()
    def sample(self, num: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
        """Sample ``num`` sequences ``(num, T)`` from the model."""
        device = self.embedding.weight.device
        token = torch.full((num,), self.start_token, dtype=torch.long, device=device)
        state: State | None = None
        out = []
        for _ in range(self.seq_len):
            logits, state = self.step(token, state)
            token = sample_categorical(logits / temperature, generator)
            out.append(token)
        return torch.stack(out, dim=1)

    def sequence_nll(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-sequence mean over tokens of −log p(y_t | y_<t): ``(B,)`` (the paper's NLL scale)."""
        logits = self(tokens)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens.reshape(-1), reduction="none")
        return nll.view(tokens.shape).mean(dim=1)

    # ------------------------------------------------------------------ the oracle
    @classmethod
    def oracle(cls, path: str | os.PathLike[str] | None = None, seed: int = 0, seq_len: int = 20) -> LSTMGenerator:
        """The SeqGAN oracle: from the released parameters (``.npz``, or the original ``target_params_py3.pkl``),
        or, with ``path=None``, randomly initialised as the paper's oracle was (N(0, 1) parameters).

        Raises:
            MissingPathError: the file does not exist.
            DataError: it lacks an array or an array has the wrong shape.
        """
        if path is None:
            generator = torch.Generator().manual_seed(seed)
            oracle = cls(5000, 32, 32, seq_len)
            with torch.no_grad():
                for param in oracle.parameters():
                    param.copy_(torch.randn(param.shape, generator=generator))
                lstm: Any = oracle.lstm
                lstm.bias_hh_l0.zero_()
            return oracle.requires_grad_(False).eval()
        arrays = _load_oracle_arrays(os.fspath(path))
        vocab, embedding_dim = arrays["embedding"].shape
        hidden_dim = arrays["U_i"].shape[0]
        oracle = cls(vocab, embedding_dim, hidden_dim, seq_len)
        lstm = oracle.lstm
        with torch.no_grad():
            oracle.embedding.weight.copy_(torch.from_numpy(arrays["embedding"]))
            # the README's x W_g is torch's W_ih @ x: stack the transposed gate matrices in torch's order
            lstm.weight_ih_l0.copy_(torch.from_numpy(np.concatenate([arrays[f"W_{g}"].T for g in _GATES])))
            lstm.weight_hh_l0.copy_(torch.from_numpy(np.concatenate([arrays[f"U_{g}"].T for g in _GATES])))
            lstm.bias_ih_l0.copy_(torch.from_numpy(np.concatenate([arrays[f"b_{g}"] for g in _GATES])))
            lstm.bias_hh_l0.zero_()
            oracle.output.weight.copy_(torch.from_numpy(arrays["W_out"].T))
            oracle.output.bias.copy_(torch.from_numpy(arrays["b_out"]))
        return oracle.requires_grad_(False).eval()


def sample_categorical(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``logits`` ``(R, V)`` → ``(R,)``, by inverse-CDF sampling.

    Several times faster than ``torch.multinomial`` on a 5,000-token vocabulary on CPU.
    """
    cdf = F.softmax(logits.float(), dim=-1).cumsum(dim=-1)  # (R, V)
    draw = torch.rand((logits.shape[0], 1), generator=generator, device=logits.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, draw)[:, 0].clamp_(max=logits.shape[-1] - 1)


_ORACLE_KEYS = ["embedding", "W_out", "b_out"] + [f"{m}_{g}" for g in _GATES for m in ("W", "U", "b")]


def _load_oracle_arrays(path: str) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise MissingPathError(f"oracle parameters {path!r} do not exist.")
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: np.asarray(data[key], dtype=np.float32) for key in data.files}
    else:
        with open(path, "rb") as handle:
            params = _ArraysOnlyUnpickler(io.BytesIO(handle.read())).load()
        # target_params_py3.pkl is the list of the TF oracle's variables in creation order
        names = [
            "embedding",
            "W_i",
            "U_i",
            "b_i",
            "W_f",
            "U_f",
            "b_f",
            "W_o",
            "U_o",
            "b_o",
            "W_c",
            "U_c",
            "b_c",
            "W_out",
            "b_out",
        ]
        if not isinstance(params, (list, tuple)) or len(params) < len(names):
            raise DataError(
                f"{path}: expected a list of {len(names)} arrays (SeqGAN's target_params), got {type(params).__name__}."
            )
        arrays = {name: np.asarray(value, dtype=np.float32) for name, value in zip(names, params)}
    missing = [key for key in _ORACLE_KEYS if key not in arrays]
    if missing:
        raise DataError(f"{path}: missing oracle arrays {missing}.")
    return arrays


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickle NumPy arrays and plain containers only: no other class can be constructed."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise DataError(f"refusing to unpickle {module}.{name}: only NumPy arrays are accepted in an oracle file.")
