"""pasd-jax data pipeline: LQ/HQ training pairs synthesised on the host with PASD's degradation, fed by Grain.

Knows nothing of models or training: it yields numpy batches. Importing this package is cheap (no Grain,
no JAX); import the submodules you need.

Contract (relied on by training; details in data_pipeline/README.md):

  data_pipeline.degradation.degrade(hq, seed, cfg=None) -> lq
      hq: HxWx3 uint8 RGB (the GT crop); lq: HxWx3 float32 in [0, 1] on 8-bit levels, same size (PASD's
      resize-back path). cfg=None is the PASD preset (data_pipeline.presets). Never flips. Deterministic in seed.

  data_pipeline.loader.make_train_iterator(cfg, *, seed, process_index, process_count, batch_size,
                                           tokenizer_path, num_workers=0, source=None) -> TrainIterator
      yields dicts of numpy arrays, B = batch_size (per host):
        hq             uint8 [B, 512, 512, 3]  GT crop, flipped consistently with lq
        lq             uint8 [B, 512, 512, 3]  degraded, resized back (PASD feeds lq/255 to the ControlNet)
        input_ids      int32 [B, 77]           CLIP-tokenized caption (no null-caption replacement: training does it)
        skip_counts    int32 [B, 6]            records skipped while making each element, by reason
                                               (data_pipeline.image_io.SKIP_REASONS)
        convert_counts int32 [B, 5]            conversions applied (CONVERT_KINDS)
      `data_pipeline.loader.count_summary(batch)` gives named per-batch totals for the metrics.
      `get_state()` / `set_state(state)`: a small JSON-serialisable dict; it resumes only with the same seed,
      process layout, batch size and num_workers (checked, with a clear error).

  data_pipeline.config.get_data_config() -> ml_collections.ConfigDict of defaults (sources, crop, degradation).
  data_pipeline.sources.ProceduralSource(n, size, seed): textured images with captions, no files (demo).
"""
