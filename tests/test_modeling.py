"""Tests of HMERConfig and HMERForConditionalGeneration with tiny models (both decoders)."""

import pytest
import torch

from modeling_hmer.configuration_hmer import HMERConfig
from transformers import LogitsProcessorList

from modeling_hmer.modeling_hmer import HMERForConditionalGeneration, reverse_labels

DECODERS = ["gru", "transformer"]
TINY = dict(
    growth_rate=8,
    block_config=(2, 2, 2),
    num_init_features=16,
    hidden_size=32,
    embedding_size=32,
    attention_dim=32,
    coverage_channels=8,
    decoder_layers=2,
    decoder_attention_heads=4,
    decoder_ffn_dim=64,
)
# four short targets (ids 4.. are symbols, 5 is \\sqrt and not used here, 2 is eos), padded with -100
LABELS = torch.tensor(
    [
        [13, 6, 7, 2, -100, -100],
        [7, 6, 13, 8, 9, 2],
        [10, 2, -100, -100, -100, -100],
        [11, 11, 12, 13, 2, -100],
    ]
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on a busy machine two OpenMP threads can be 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(decoder: str, seed: int = 0, **overrides) -> HMERForConditionalGeneration:
    torch.manual_seed(seed)
    return HMERForConditionalGeneration(HMERConfig(decoder=decoder, **{**TINY, **overrides})).eval()


def random_images(*sizes, seed=1):
    """Binary noise images (1, 1, H, W), ink 1 on 0."""
    generator = torch.Generator().manual_seed(seed)
    return [(torch.rand(1, 1, h, w, generator=generator) > 0.8).float() for h, w in sizes]


def pad_batch(images):
    """list of (1, 1, H_i, W_i) -> (B, 1, H, W) zero-padded at the bottom / right, (B, H, W) mask."""
    height = max(x.shape[2] for x in images)
    width = max(x.shape[3] for x in images)
    pixels = torch.zeros(len(images), 1, height, width)
    mask = torch.zeros(len(images), height, width, dtype=torch.long)
    for i, x in enumerate(images):
        pixels[i, :, : x.shape[2], : x.shape[3]] = x
        mask[i, : x.shape[2], : x.shape[3]] = 1
    return pixels, mask


def targets(labels):
    """labels (B, T) -> list of id lists as generate returns them (up to eos)."""
    return [[t for t in row if t != -100] for row in labels.tolist()]


def generated(sequences):
    return [[t for t in row if t != 0] for row in sequences.tolist()]


# ---------------------------------------------------------------------------------------------------------------


def test_config_presets_and_overrides(tmp_path):
    default = HMERConfig()
    assert default.model_type == "hmer"
    assert (default.encoder_type, default.decoder_type) == ("densenet-b", "gru")
    assert (default.growth_rate, default.block_config, default.num_init_features) == (24, [16, 16, 16], 48)
    assert (default.encoder_hidden_size, default.encoder_stride) == (684, 16)
    assert (default.hidden_size, default.embedding_size, default.attention_dim) == (256, 256, 512)
    assert (default.vocab_size, default.pad_token_id, default.bos_token_id, default.eos_token_id) == (114, 0, 1, 2)
    assert default.decoder_start_token_id == 1

    seed = HMERConfig(encoder="densenet121")
    assert (seed.growth_rate, seed.block_config, seed.encoder_hidden_size, seed.encoder_stride) == (
        32,
        [6, 12, 24, 16],
        1024,
        32,
    )
    transformer = HMERConfig(decoder_type="transformer", growth_rate=12, use_coverage=False)
    assert transformer.growth_rate == 12 and transformer.block_config == [16, 16, 16]
    assert (transformer.decoder_layers, transformer.hidden_size, transformer.decoder_attention_heads) == (3, 256, 8)
    assert transformer.decoder_ffn_dim == 1024 and not transformer.use_coverage
    assert HMERConfig(decoder="transformer").use_coverage

    transformer.save_pretrained(tmp_path)
    assert HMERConfig.from_pretrained(tmp_path).to_dict() == transformer.to_dict()

    with pytest.raises(ValueError, match="encoder preset"):
        HMERConfig(encoder="resnet")
    with pytest.raises(ValueError, match="decoder"):
        HMERConfig(decoder="lstm")


def test_default_encoder_is_densenet_b():
    model = HMERForConditionalGeneration(HMERConfig()).eval()
    encoder_params = sum(p.numel() for p in model.encoder.parameters())
    assert 2.8e6 < encoder_params < 3.2e6  # DWAP's DenseNet-B: about 3.0M
    with torch.no_grad():
        features, mask = model.encode(torch.zeros(1, 1, 64, 128))
    assert features.shape == (1, 684, 4, 8) and mask.shape == (1, 4, 8) and bool(mask.all())


@pytest.mark.parametrize("decoder", DECODERS)
def test_forward_shapes_and_attention(decoder):
    model = tiny_model(decoder)
    pixels, mask = pad_batch(random_images((40, 70), (64, 96)))
    labels = LABELS[:2]
    with torch.no_grad():
        out = model(pixels, mask, labels=labels, output_attentions=True)
    assert out.logits.shape == (2, 6, 114)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.encoder_last_hidden_state.shape == (2, model.config.encoder_hidden_size, 4, 6)
    assert out.feature_mask.shape == (2, 4, 6)
    assert out.feature_mask.sum((1, 2)).tolist() == [2 * 4, 4 * 6]  # 40x70 px -> 2x4 cells
    assert out.attentions.shape == (2, 6, 4, 6)
    torch.testing.assert_close(out.attentions.sum((2, 3)), torch.ones(2, 6))
    assert float(out.attentions[0][:, ~out.feature_mask[0]].abs().max()) == 0.0  # nothing on padding

    with torch.no_grad():
        no_dict = model(pixels, mask, labels=labels, return_dict=False)
    assert isinstance(no_dict, tuple)
    torch.testing.assert_close(no_dict[1], out.logits)
    with pytest.raises(ValueError, match="labels or decoder_input_ids"):
        model(pixels, mask)


@pytest.mark.parametrize("decoder", DECODERS)
def test_padding_does_not_change_outputs(decoder):
    model = tiny_model(decoder)
    small, large = random_images((37, 70), (50, 90))
    pixels, mask = pad_batch([small, large])
    labels = LABELS[:2]
    with torch.no_grad():
        batched = model(pixels, mask, labels=labels, output_attentions=True)
        alone = model(small, labels=labels[:1], output_attentions=True)
        # the same image padded with zeros but no mask must differ: the mask is what makes this work
        unmasked = model(pixels[:1], labels=labels[:1])
    torch.testing.assert_close(batched.logits[:1], alone.logits, atol=1e-4, rtol=1e-4)
    h, w = alone.attentions.shape[2:]
    torch.testing.assert_close(batched.attentions[:1, :, :h, :w], alone.attentions, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(unmasked.logits, alone.logits, atol=1e-4)


@pytest.mark.parametrize("decoder", DECODERS)
def test_step_by_step_decoding_matches_teacher_forcing(decoder):
    """The cached per-step decoder used by generate computes the same as the parallel training pass."""
    model = tiny_model(decoder)
    pixels, mask = pad_batch(random_images((40, 70), (64, 96)))
    inputs = torch.tensor([[1, 5, 6, 7, 8], [2, 9, 9, 4, 5]])  # second row: right-to-left start for transformers
    with torch.no_grad():
        static = model.decoder.prepare(*model.encode(pixels, mask))
        logits, attention = model.decoder(static, inputs)
        state = model.decoder.init_state(static)
        for t in range(inputs.shape[1]):
            step_logits, step_attention, state = model.decoder.step(inputs[:, t], static, state)
            torch.testing.assert_close(step_logits, logits[:, t], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(step_attention, attention[:, t], atol=1e-5, rtol=1e-4)


def test_reverse_labels():
    labels = torch.tensor([[5, 6, 7, 2, -100], [8, 2, -100, -100, -100], [4, 5, 6, 7, 9]])
    assert reverse_labels(labels, eos_token_id=2).tolist() == [
        [7, 6, 5, 2, -100],
        [8, 2, -100, -100, -100],
        [9, 7, 6, 5, 4],
    ]


@pytest.mark.parametrize("decoder", DECODERS)
def test_overfit_small_batch_then_generate_targets(decoder):
    model = tiny_model(decoder, dropout=0.0)
    pixels = torch.cat(random_images(*[(32, 64)] * 4, seed=3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for module in model.modules():  # fixed batch-norm statistics: training and eval compute the same function
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    for _ in range(300):
        loss = model(pixels, labels=LABELS).loss
        if loss.item() < 0.005:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert model(pixels, labels=LABELS).loss.item() < 0.01
    expected = targets(LABELS)
    assert generated(model.generate(pixels, max_new_tokens=10)) == expected
    # beam search; for the transformer also right-to-left search and bidirectional re-scoring
    beams = model.generate(pixels, num_beams=3, max_new_tokens=10, return_dict_in_generate=True)
    assert generated(beams.sequences) == expected
    assert bool((beams.sequences_scores > -0.05).all())
    if decoder == "transformer":
        r2l = model.decoder  # right-to-left greedy decoding reads the reversed targets
        starts = torch.full((4,), model.config.r2l_start_token_id)
        with torch.no_grad():
            static = r2l.prepare(*model.encode(pixels))
            found = model._greedy_search(static, starts, False, max_new_tokens=10, processors=LogitsProcessorList())
        reversed_targets = targets(reverse_labels(LABELS, model.config.eos_token_id))
        assert generated(found["tokens"]) == reversed_targets


@pytest.mark.parametrize("decoder", DECODERS)
def test_greedy_equals_beam_search_with_one_beam(decoder):
    model = tiny_model(decoder, seed=2)
    pixels, mask = pad_batch(random_images((40, 70), (64, 96), (33, 120)))
    with torch.no_grad():
        static = model.decoder.prepare(*model.encode(pixels, mask))
        starts = torch.full((3,), model.config.decoder_start_token_id)
        settings = dict(max_new_tokens=12, processors=model._logits_processors(model.generation_config, 12, 4, None, None))
        greedy = model._greedy_search(static, starts, True, **settings)
        beam = model._beam_search(static, starts, 1, True, **settings)
    assert torch.equal(greedy["tokens"], beam["tokens"])
    torch.testing.assert_close(greedy["token_scores"], beam["token_scores"])
    torch.testing.assert_close(greedy["attentions"], beam["attentions"])
    # and the public entry point, greedy by default
    assert torch.equal(model.generate(pixels, mask, max_new_tokens=12, min_new_tokens=4), greedy["tokens"])


@pytest.mark.parametrize("decoder", DECODERS)
def test_beam_search_scores_match_teacher_forcing(decoder):
    """Each returned beam's token log-probs are what the model gives that sequence when it is fed as labels."""
    model = tiny_model(decoder, seed=7)
    pixels, mask = pad_batch(random_images((40, 70), (64, 96)))
    out = model.generate(
        pixels,
        mask,
        num_beams=4,
        num_return_sequences=4,
        max_new_tokens=8,
        min_new_tokens=2,
        output_scores=True,
        bidirectional_rescoring=False,
    )
    labels = out.sequences.masked_fill(out.sequences == 0, -100)
    images = torch.arange(2).repeat_interleave(4)
    with torch.no_grad():
        logits = model(pixels[images], mask[images], labels=labels, decoder_input_ids=None).logits
        if decoder == "transformer":  # forward trained both directions; keep the left-to-right logits
            logits = logits[: labels.shape[0]]
    logp = torch.log_softmax(logits, -1).gather(2, labels.clamp(min=0).unsqueeze(2)).squeeze(2)
    logp = logp.masked_fill(labels == -100, 0.0)
    torch.testing.assert_close(out.transition_scores, logp, atol=1e-4, rtol=1e-4)
    lengths = (labels != -100).sum(1)
    torch.testing.assert_close(out.sequences_scores, logp.sum(1) / lengths, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("num_beams", [1, 3])
def test_padded_batch_generates_as_one_at_a_time(decoder, num_beams):
    model = tiny_model(decoder, seed=3)
    images = random_images((40, 70), (64, 96), (33, 120))
    pixels, mask = pad_batch(images)
    kwargs = dict(num_beams=num_beams, max_new_tokens=10, min_new_tokens=3, output_attentions=True)
    batched = model.generate(pixels, mask, **kwargs)
    for i, image in enumerate(images):
        alone = model.generate(image, **kwargs)
        assert generated(batched.sequences[i : i + 1]) == generated(alone.sequences)
        torch.testing.assert_close(batched.sequences_scores[i : i + 1], alone.sequences_scores, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(batched.attentions[i], alone.attentions[0], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("decoder", DECODERS)
def test_generate_attentions_one_map_per_token(decoder):
    model = tiny_model(decoder, seed=4)
    pixels, mask = pad_batch(random_images((40, 70), (64, 96)))
    out = model.generate(pixels, mask, max_new_tokens=7, output_attentions=True, output_scores=True)
    assert len(out.attentions) == 2
    for i, (h, w) in enumerate([(2, 4), (4, 6)]):
        length = int((out.sequences[i] != 0).sum())
        assert out.attentions[i].shape == (length, h, w)
        torch.testing.assert_close(out.attentions[i].sum((1, 2)), torch.ones(length))
    assert out.transition_scores.shape == out.sequences.shape
    assert bool((out.transition_scores[out.sequences == 0] == 0).all()) and bool((out.transition_scores <= 0).all())
    lengths = (out.sequences != 0).sum(1)
    torch.testing.assert_close(out.sequences_scores, out.transition_scores.sum(1) / lengths)
    # sequences have no start token; they end with eos (or at max_new_tokens), then pad
    for row in out.sequences.tolist():
        tokens = [t for t in row if t != 0]
        assert model.config.bos_token_id not in tokens
        assert 2 not in tokens[:-1]


@pytest.mark.parametrize("decoder", DECODERS)
def test_num_return_sequences(decoder):
    model = tiny_model(decoder, seed=5)
    pixels, mask = pad_batch(random_images((40, 70), (64, 96)))
    out = model.generate(pixels, mask, num_beams=4, num_return_sequences=3, max_new_tokens=6, output_attentions=True)
    assert out.sequences.shape[0] == 6 and out.sequences_scores.shape == (6,) and len(out.attentions) == 6
    for image in range(2):
        rows = generated(out.sequences[3 * image : 3 * image + 3])
        assert len({tuple(r) for r in rows}) == 3  # distinct candidates
        scores = out.sequences_scores[3 * image : 3 * image + 3]
        assert bool((scores[:-1] >= scores[1:]).all())  # best first
    best = model.generate(pixels, mask, num_beams=4, max_new_tokens=6)
    assert generated(best) == [generated(out.sequences)[0], generated(out.sequences)[3]]
    with pytest.raises(ValueError, match="num_return_sequences"):
        model.generate(pixels, mask, num_beams=2, num_return_sequences=3)


@pytest.mark.parametrize("decoder", DECODERS)
def test_save_and_load_give_identical_outputs(decoder, tmp_path):
    model = tiny_model(decoder, seed=6)
    model.generation_config.num_beams = 2
    pixels, mask = pad_batch(random_images((40, 70), (64, 96)))
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors"} <= files
    assert not any(name.endswith(".bin") for name in files)

    loaded = HMERForConditionalGeneration.from_pretrained(tmp_path)
    assert not loaded.training and loaded.generation_config.num_beams == 2
    with torch.no_grad():
        reference = model(pixels, mask, labels=LABELS[:2]).logits
        assert torch.equal(loaded(pixels, mask, labels=LABELS[:2]).logits, reference)
    kwargs = dict(max_new_tokens=8, min_new_tokens=3, return_dict_in_generate=True)
    a, b = model.generate(pixels, mask, **kwargs), loaded.generate(pixels, mask, **kwargs)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.sequences_scores, b.sequences_scores)


def test_channels_last_and_bfloat16_autocast():
    model = tiny_model("gru")
    pixels, mask = pad_batch(random_images((40, 70), (64, 96)))
    with torch.no_grad():
        reference = model(pixels, mask, labels=LABELS[:2]).logits
        model.to(memory_format=torch.channels_last)
        torch.testing.assert_close(model(pixels, mask, labels=LABELS[:2]).logits, reference, atol=1e-4, rtol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(pixels, mask, labels=LABELS[:2]).logits
            ids = model.generate(pixels, mask, num_beams=2, max_new_tokens=5)  # bf16 decoding
            one = model.generate(pixels[:1], max_new_tokens=5, return_dict_in_generate=True)  # fp32 steps
    assert torch.isfinite(logits).all() and ids.shape[0] == 2
    assert one.sequences.shape[0] == 1 and torch.isfinite(one.sequences_scores).all()


def test_bad_inputs_give_clear_errors():
    model = tiny_model("gru")
    with pytest.raises(ValueError, match="shape \\(batch, 1, height, width\\)"):
        model.generate(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="too small"):
        model.generate(torch.zeros(1, 1, 8, 200))
    with pytest.raises(ValueError, match="pixel_mask must have shape"):
        model.generate(torch.zeros(1, 1, 64, 64), torch.ones(1, 32, 32))
    holes = torch.ones(1, 64, 64)
    holes[0, 10, 10] = 0
    with pytest.raises(ValueError, match="top-left rectangle"):
        model.generate(torch.zeros(1, 1, 64, 64), holes)
    with pytest.raises(TypeError, match="unsupported argument 'do_sample'"):
        model.generate(torch.zeros(1, 1, 64, 64), do_sample=True)
