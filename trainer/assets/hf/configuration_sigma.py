"""Configuration of SIGMA models exported by sigma (`sigma checkpoint export --format hf`)."""

from transformers import PretrainedConfig


class SigmaConfig(PretrainedConfig):
    """The `[model]` section of a sigma run: DiffQKV attention with separate
    query, key and value head counts and dimensions, optional augmented query
    (AugQ) and K-dimension compression in either reading."""

    model_type = "sigma"

    def __init__(
        self,
        vocab_size=32000,
        d_model=2048,
        num_layers=24,
        ffn_dim=6144,
        num_q_heads=32,
        num_k_heads=4,
        num_v_heads=16,
        qk_head_dim=64,
        v_head_dim=64,
        aug_q_dim=0,
        k_compression="none",
        k_dim=None,
        rope_theta=10000.0,
        norm_eps=1e-5,
        tie_embeddings=True,
        init_std=0.02,
        max_position_embeddings=4096,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.hidden_size = d_model
        self.num_layers = num_layers
        self.num_hidden_layers = num_layers
        self.ffn_dim = ffn_dim
        self.num_q_heads = num_q_heads
        self.num_attention_heads = num_q_heads
        self.num_k_heads = num_k_heads
        self.num_v_heads = num_v_heads
        self.qk_head_dim = qk_head_dim
        self.v_head_dim = v_head_dim
        self.aug_q_dim = aug_q_dim
        self.k_compression = k_compression
        self.k_dim = k_dim
        self.rope_theta = rope_theta
        self.norm_eps = norm_eps
        self.tie_embeddings = tie_embeddings
        self.init_std = init_std
        self.max_position_embeddings = max_position_embeddings
        kwargs["tie_word_embeddings"] = tie_embeddings
        super().__init__(**kwargs)

    @property
    def dot_dim(self):
        """Dimension of the q.k product (smaller under the "native" reading)."""
        if self.k_compression == "native":
            return self.k_dim
        return self.qk_head_dim

    @property
    def k_cache_dim(self):
        """Per-head dimension of K as computed from the input (what a KV cache holds)."""
        if self.k_compression == "none":
            return self.qk_head_dim
        return self.k_dim
