//! Data pipeline properties: round trips, packing, mixing, determinism, resume, dp.

use std::collections::BTreeMap;
use std::sync::Arc;

use sigma_data::loader::LoaderOptions;
use sigma_data::manifest::{Manifest, Split};
use sigma_data::prepare::{prepare, PrepareOptions};
use sigma_data::shard::ShardReader;
use sigma_data::store::block_on;
use sigma_data::{Batch, DataConfig, DataState, Dataset, Loader, Tokenizer};
use sigma_tests::*;

fn dataset(extra: &str) -> Arc<Dataset> {
    let cfg = DataConfig::from_toml("test.toml", &sample_config(extra)).expect("config");
    Dataset::open_blocking(&cfg).expect("open dataset")
}

const MIX: &str = "[data.mixture]\ngeneral = 0.5\nsystem = 0.3\nsynthetic = 0.2\n";

fn batches(
    ds: &Arc<Dataset>,
    g: usize,
    rank: usize,
    dp: usize,
    start: u64,
    n: usize,
) -> Vec<Batch> {
    let st = DataState {
        consumed_samples: start,
        stage: 0,
    };
    let mut l = Loader::new(
        ds.clone(),
        LoaderOptions {
            global_batch: g,
            dp_rank: rank,
            dp_size: dp,
            start: st,
        },
    )
    .expect("loader");
    (0..n).map(|_| l.next_batch().expect("batch")).collect()
}

/// All documents of one split of a prepared directory, in manifest order.
fn shard_docs(dir: &std::path::Path, split: Split) -> Vec<Vec<u32>> {
    block_on(async {
        let (m, loc) = Manifest::load(&dir.to_string_lossy())
            .await
            .expect("manifest");
        let mut docs = Vec::new();
        for s in m.shards.iter().filter(|s| s.split == split) {
            let r = ShardReader::open(loc.join(&s.file))
                .await
                .expect("open shard");
            for (i, rg) in s.row_groups.iter().enumerate() {
                let t = r.read_row_group(i, rg).await.expect("row group");
                docs.extend((0..t.num_docs()).map(|d| t.doc(d).to_vec()));
            }
        }
        docs
    })
}

#[test]
fn text_tokens_text_round_trip_through_shards() {
    let tok = Tokenizer::load(&sample("tokenizer.json")).expect("tokenizer");
    // Direct round trip, including text that spells a special token.
    for text in [
        "Hello, world!\n\tindented",
        "nvidia-smi -i 3 -pl 350 ÄÖü 数据 🚀",
        "literal <|endoftext|> inside",
    ] {
        let ids = tok.encode(text).expect("encode");
        assert!(
            !ids.contains(&tok.eos_id),
            "EOS inside a document for {text:?}"
        );
        assert_eq!(tok.decode(&ids, false).expect("decode"), text);
    }
    // Through prepare and the Parquet shards: every stored document decodes to an input text.
    let inputs: Vec<String> = (0..120)
        .map(|i| sigma_data::synth::document(7, i))
        .collect();
    let mut decoded: Vec<String> = [Split::Train, Split::Valid]
        .iter()
        .flat_map(|&s| shard_docs(&sample_shards().join("synthetic"), s))
        .map(|d| tok.decode(&d, false).expect("decode"))
        .collect();
    let mut expected = inputs.clone();
    decoded.sort();
    expected.sort();
    assert_eq!(decoded, expected);
}

#[test]
fn each_epoch_is_a_permutation_of_the_documents_joined_by_eos() {
    let ds = dataset(MIX);
    let d = ds
        .domains
        .iter()
        .position(|d| d == "synthetic")
        .expect("domain");
    let eos = ds.tokenizer.eos_id;
    let epoch = ds.epoch_tokens(d) as usize;
    let l = ds.seq_len();
    // Rebuild the stream from consecutive samples (they overlap by one token).
    let mut stream: Vec<u32> = Vec::new();
    let mut j = 0u64;
    while stream.len() < 2 * epoch + 1 {
        let (mut toks, mut starts) = (Vec::new(), Vec::new());
        block_on(ds.domain_sample(d, j, &mut toks, &mut starts)).expect("sample");
        assert_eq!(toks.len(), l + 1);
        // Document starts are exactly the positions after an EOS (or the stream start).
        for i in 0..toks.len() {
            let prev = if i > 0 {
                Some(toks[i - 1])
            } else {
                stream.len().checked_sub(2).map(|k| stream[k])
            };
            let is_start = prev.is_none() || prev == Some(eos);
            assert_eq!(
                starts.contains(&(i as u32)),
                is_start,
                "sample {j} offset {i}"
            );
        }
        if j == 0 {
            stream.extend_from_slice(&toks);
        } else {
            assert_eq!(stream.last(), toks.first(), "samples overlap by one token");
            stream.extend_from_slice(&toks[1..]);
        }
        j += 1;
    }
    let mut want = shard_docs(&sample_shards().join("synthetic"), Split::Train);
    want.sort();
    let mut orders = Vec::new();
    for e in 0..2 {
        let part = &stream[e * epoch..(e + 1) * epoch];
        assert_eq!(part.last(), Some(&eos));
        let mut docs: Vec<Vec<u32>> = part[..part.len() - 1]
            .split(|&t| t == eos)
            .map(|s| s.to_vec())
            .collect();
        orders.push(docs.clone());
        docs.sort();
        assert_eq!(
            docs, want,
            "epoch {e} is not a permutation of the documents"
        );
    }
    assert_ne!(orders[0], orders[1], "each epoch has a fresh order");
}

fn domain_counts_by_prefix(batches: &[Batch], nd: usize) -> Vec<Vec<u64>> {
    let mut c = vec![0u64; nd];
    let mut out = Vec::new();
    for b in batches {
        for &d in &b.domains {
            c[d as usize] += 1;
            out.push(c.clone());
        }
    }
    out
}

#[test]
fn realized_ratios_track_targets_within_one_sample_at_every_prefix() {
    let ds = dataset(MIX);
    let w: Vec<f64> = ds.mixer.stages[0].weights.clone();
    let bs = batches(&ds, 16, 0, 1, 0, 60);
    for (k, counts) in domain_counts_by_prefix(&bs, w.len()).iter().enumerate() {
        for d in 0..w.len() {
            let err = counts[d] as f64 - w[d] * (k + 1) as f64;
            assert!(err.abs() < 1.0, "prefix {} domain {d}: {counts:?}", k + 1);
        }
    }
}

#[test]
fn same_config_same_stream_and_seed_matters() {
    let a = batches(&dataset(MIX), 8, 0, 1, 0, 20);
    let b = batches(&dataset(MIX), 8, 0, 1, 0, 20);
    assert_eq!(a, b);
    let other = DataConfig::from_toml("t", &sample_config(MIX).replace("seed = 5", "seed = 6"))
        .expect("cfg");
    let c = batches(
        &Dataset::open_blocking(&other).expect("open"),
        8,
        0,
        1,
        0,
        20,
    );
    let tokens = |v: &[Batch]| v.iter().map(|b| b.tokens.clone()).collect::<Vec<_>>();
    assert_ne!(tokens(&a), tokens(&c), "another seed gives another order");
}

#[test]
fn stop_at_k_and_resume_gives_the_identical_stream() {
    let ds = dataset(MIX);
    let full = batches(&ds, 16, 0, 1, 0, 40);
    let k = 17;
    let state = full[k - 1].state;
    assert_eq!(state.consumed_samples, 16 * k as u64);
    let resumed = batches(&dataset(MIX), 16, 0, 1, state.consumed_samples, 40 - k);
    assert_eq!(&full[k..], &resumed[..]);
}

fn concat_ranks(per_rank: &[Vec<Batch>]) -> Vec<(Vec<u32>, Vec<u16>, Vec<u64>)> {
    (0..per_rank[0].len())
        .map(|i| {
            let mut t = Vec::new();
            let mut d = Vec::new();
            let mut s = Vec::new();
            for r in per_rank {
                t.extend_from_slice(&r[i].tokens);
                d.extend_from_slice(&r[i].domains);
                s.extend_from_slice(&r[i].sample_indices);
            }
            (t, d, s)
        })
        .collect()
}

#[test]
fn global_stream_is_identical_for_dp_1_2_4_and_across_a_dp_change() {
    let ds = dataset(MIX);
    let g = 16;
    let one = concat_ranks(&[batches(&ds, g, 0, 1, 0, 25)]);
    for dp in [2, 4] {
        let ranks: Vec<Vec<Batch>> = (0..dp).map(|r| batches(&ds, g, r, dp, 0, 25)).collect();
        assert!(ranks.iter().all(|b| b[0].rows == g / dp));
        assert_eq!(concat_ranks(&ranks), one, "dp = {dp}");
    }
    // Resume: 10 batches on dp = 2, then continue on dp = 4 from the saved state.
    let first: Vec<Vec<Batch>> = (0..2).map(|r| batches(&ds, g, r, 2, 0, 10)).collect();
    let state = first[0][9].state;
    let rest: Vec<Vec<Batch>> = (0..4)
        .map(|r| batches(&ds, g, r, 4, state.consumed_samples, 15))
        .collect();
    let mut joined = concat_ranks(&first);
    joined.extend(concat_ranks(&rest));
    assert_eq!(joined, one);
}

#[test]
fn stages_switch_at_the_configured_token_counts() {
    // 64 tokens per sample: stage 0 holds the samples starting below token 2369,
    // i.e. samples 0..=37 (sample 37 starts at token 2368), stage 1 starts at sample 38.
    let stages = "[[data.stages]]\nuntil_tokens = 2369\nmixture = { general = 1.0 }\n\
                  [[data.stages]]\nuntil_tokens = 5000\nmixture = { system = 0.5, synthetic = 0.5 }\n\
                  [[data.stages]]\nmixture = { general = 0.25, system = 0.25, synthetic = 0.5 }\n";
    let ds = dataset(stages);
    let gi = ds
        .domains
        .iter()
        .position(|d| d == "general")
        .expect("general") as u16;
    let bs = batches(&ds, 2, 0, 1, 0, 60);
    let doms: Vec<u16> = bs.iter().flat_map(|b| b.domains.clone()).collect();
    assert!(doms[..38].iter().all(|&d| d == gi));
    assert!(
        doms[38..79].iter().all(|&d| d != gi),
        "stage 1 (samples 38..79) has no general"
    );
    assert!(doms[79..].contains(&gi));
    let stage_after: Vec<usize> = bs.iter().map(|b| b.state.stage).collect();
    assert_eq!(stage_after[17], 0); // 36 samples consumed: the next one (36) is in stage 0
    assert_eq!(stage_after[18], 1); // 38 consumed: sample 38 is the first of stage 1
    assert_eq!(stage_after[38], 1); // 78 consumed: sample 78 starts at token 4992 < 5000
    assert_eq!(stage_after[39], 2); // 80 consumed: stage 2 began at sample 79 (token 5056)
}

#[test]
fn prepare_is_deterministic_and_independent_of_thread_count() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut shas = Vec::new();
    for threads in [1, 2] {
        let out = dir.path().join(format!("t{threads}"));
        let mut o = PrepareOptions::new(
            vec![sample("system.jsonl.zst")],
            "system",
            &sample("tokenizer.json"),
            &out.to_string_lossy(),
        );
        o.threads = threads;
        o.row_group_tokens = 20_000;
        let r = prepare(&o).expect("prepare");
        assert!(r.manifest.shards.iter().any(|s| s.row_groups.len() > 3));
        shas.push(
            r.manifest
                .shards
                .iter()
                .map(|s| (s.file.clone(), s.sha256.clone()))
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(shas[0], shas[1]);
}

#[test]
fn validation_split_is_chosen_by_document_hash() {
    let shards = sample_shards().join("synthetic");
    let texts: BTreeMap<String, ()> = (0..120)
        .map(|i| (sigma_data::synth::document(7, i), ()))
        .collect();
    let tok = Tokenizer::load(&sample("tokenizer.json")).expect("tokenizer");
    let valid: Vec<String> = shard_docs(&shards, Split::Valid)
        .iter()
        .map(|d| tok.decode(d, false).expect("decode"))
        .collect();
    let expect: Vec<String> = texts
        .keys()
        .filter(|t| sigma_data::prepare::split_of(xxhash_of(t), 0.05) == Split::Valid)
        .cloned()
        .collect();
    let mut got = valid.clone();
    got.sort();
    assert_eq!(got, expect);
    assert!(
        !got.is_empty() && got.len() < 20,
        "about 5% of 120 documents, got {}",
        got.len()
    );
}

/// xxh3-64 of the text, as the manifest format defines the split hash.
fn xxhash_of(t: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(t.as_bytes())
}

#[test]
fn memory_object_store_gives_the_same_stream_as_local_files() {
    for d in ["general", "system", "synthetic"] {
        let input = if d == "synthetic" {
            process_dir()
                .join("synthetic-small.jsonl")
                .to_string_lossy()
                .into_owned()
        } else {
            sample(&format!("{d}.jsonl.zst"))
        };
        sample_shards();
        let mut o = PrepareOptions::new(
            vec![input],
            d,
            &sample("tokenizer.json"),
            &format!("memory://mem-test/shards/{d}"),
        );
        o.row_group_tokens = 8192;
        o.valid_fraction = 0.05;
        prepare(&o).expect("prepare into memory store");
    }
    let local = sample_config(MIX);
    let root = sample_shards().to_string_lossy().into_owned();
    let mem = local.replace(&format!("{root}/"), "memory://mem-test/shards/");
    assert_ne!(local, mem);
    let a = batches(
        &Dataset::open_blocking(&DataConfig::from_toml("l", &local).expect("cfg")).expect("open"),
        8,
        0,
        1,
        0,
        30,
    );
    let b = batches(
        &Dataset::open_blocking(&DataConfig::from_toml("m", &mem).expect("cfg")).expect("open"),
        8,
        0,
        1,
        0,
        30,
    );
    assert_eq!(a, b);
}

#[test]
fn a_failed_prepare_leaves_the_previous_data_intact_and_no_partial_manifest() {
    let dir = tempfile::tempdir().expect("tmp");
    let good = dir.path().join("good.jsonl");
    write_file(
        &good,
        b"{\"text\": \"alpha beta\"}\n{\"text\": \"gamma\"}\n",
    );
    let bad = dir.path().join("z-bad.jsonl");
    write_file(&bad, b"{\"text\": \"ok\"}\n{\"text\": \"\xff\xfe\"}\n");
    let out = dir.path().join("out");
    let outs = out.to_string_lossy().into_owned();
    // A fresh output: the failure leaves no manifest and no staging directory.
    let mut o = PrepareOptions::new(
        vec![good.to_string_lossy().into(), bad.to_string_lossy().into()],
        "general",
        &sample("tokenizer.json"),
        &outs,
    );
    let e = prepare(&o)
        .expect_err("invalid UTF-8 must fail")
        .to_string();
    assert!(e.contains("z-bad.jsonl:2"), "{e}");
    let left: Vec<_> = std::fs::read_dir(&out)
        .map(|r| r.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
    // An existing output survives a failed overwrite untouched.
    o.inputs = vec![good.to_string_lossy().into()];
    prepare(&o).expect("prepare");
    let before = std::fs::read(out.join("manifest.json")).expect("manifest");
    o.inputs.push(bad.to_string_lossy().into());
    o.overwrite = true;
    prepare(&o).expect_err("must fail");
    assert_eq!(
        std::fs::read(out.join("manifest.json")).expect("manifest"),
        before
    );
    let r = sigma_data::inspect::inspect(&outs, true).expect("inspect");
    assert!(r.healthy(), "{r}");
}

#[test]
fn parquet_inputs_with_a_text_column_are_read() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path().join("dump.parquet");
    write_parquet(&p, "text", &["first document", "second one", ""]);
    let out = dir.path().join("out");
    let o = PrepareOptions::new(
        vec![p.to_string_lossy().into()],
        "general",
        &sample("tokenizer.json"),
        &out.to_string_lossy(),
    );
    let r = prepare(&o).expect("prepare parquet");
    assert_eq!(r.documents(), 2, "the empty row is skipped");
}

/// A FineWeb-style Parquet file with one string column.
pub fn write_parquet(path: &std::path::Path, column: &str, rows: &[&str]) {
    use arrow_array::{RecordBatch, StringArray};
    let arr = Arc::new(StringArray::from(rows.to_vec())) as Arc<dyn arrow_array::Array>;
    let batch = RecordBatch::try_from_iter([(column, arr)]).expect("batch");
    let f = std::fs::File::create(path).expect("create");
    let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None).expect("writer");
    w.write(&batch).expect("write");
    w.close().expect("close");
}

/// A tokenizer.json laid out like Llama 3's: regex Split pre-tokenizer, byte-level
/// without its own regex, `<|end_of_text|>` as end of document, a BOS template.
fn llama3_style_tokenizer(path: &std::path::Path) {
    let mut t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sample("tokenizer.json")).expect("read"))
            .expect("json");
    t["added_tokens"][0]["content"] = "<|end_of_text|>".into();
    let vocab = t["model"]["vocab"].as_object_mut().expect("vocab");
    let id = vocab.remove("<|endoftext|>").expect("eos in vocab");
    vocab.insert("<|end_of_text|>".into(), id);
    t["model"]["ignore_merges"] = true.into();
    let pattern = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    t["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]});
    t["post_processor"] = serde_json::json!({"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
         "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [1], "tokens": ["<|begin_of_text|>"]}}}]});
    std::fs::write(path, serde_json::to_vec(&t).expect("json")).expect("write");
}

#[test]
fn a_llama3_style_tokenizer_works_for_prepare_and_loading() {
    let dir = tempfile::tempdir().expect("tmp");
    let tpath = dir.path().join("llama3-style.json");
    llama3_style_tokenizer(&tpath);
    let tok = Tokenizer::load(&tpath.to_string_lossy()).expect("load");
    assert_eq!(tok.eos_id, 0, "EOS found under Llama 3's name");
    assert_eq!(tok.bos_id, Some(1));
    let text = "Run nvidia-smi -i 3 at 12345 o'clock, isn't it?\n\n  done";
    let ids = tok.encode(text).expect("encode");
    assert!(!ids.contains(&1), "no BOS added when encoding documents");
    assert_eq!(tok.decode(&ids, false).expect("decode"), text);
    let out = dir.path().join("out");
    let o = PrepareOptions::new(
        vec![sample("synthetic.jsonl.zst")],
        "synthetic",
        &tpath.to_string_lossy(),
        &out.to_string_lossy(),
    );
    let r = prepare(&o).expect("prepare with the Llama-3-style tokenizer");
    assert_eq!(r.manifest.tokenizer.eos_id, 0);
    let cfg = format!("[data]\nseq_len = 32\ntokenizer = {:?}\n[[data.sources]]\nmanifest = {:?}\n[data.mixture]\nsynthetic = 1.0\n", tpath.to_string_lossy(), out.to_string_lossy());
    let ds = Dataset::open_blocking(&DataConfig::from_toml("c", &cfg).expect("cfg")).expect("open");
    let s = block_on(ds.sample(0)).expect("sample");
    assert_eq!(s.tokens.len(), 33);
}
