//! Networks for any number of image channels: the stem's channel count read off a checkpoint, and a pretrained
//! RGB stem adapted to N channels exactly as timm's `adapt_input_conv` (its own outputs are the fixture).

mod common;

use common::{Fixture, assert_close};
use resnet_rs::weights::adapt::adapt_input_conv;

#[test]
fn adapt_input_conv_matches_timm() {
    let f = Fixture::load("adapt_input_conv.safetensors");
    for stem in ["imagenet", "cifar"] {
        let w = f.get(&format!("{stem}.weight"));
        for n in [1, 2, 4, 13] {
            let got = adapt_input_conv(w, n).unwrap();
            assert_close(&format!("{stem} stem to {n} channels"), &got, f.get(&format!("{stem}.to{n}")), 1e-6);
        }
        assert_eq!(adapt_input_conv(w, 3).unwrap().data(), w.data(), "3 channels stay as they are");
    }
    let wide = f.get("wide.weight");
    assert_close("13-channel stem to 1", &adapt_input_conv(wide, 1).unwrap(), f.get("wide.to1"), 1e-6);
    let err = adapt_input_conv(wide, 4).unwrap_err().to_string();
    assert!(err.contains("only an RGB (3-channel) stem"), "{err}");
}

#[test]
fn images_may_have_as_many_bands_as_a_stem_takes() {
    assert_eq!(resnet_rs::imaging::MAX_BANDS, resnet_rs::model::MAX_IN_CHANNELS);
}

mod end_to_end {
    //! A 3-channel checkpoint fine-tuned, through the CLI, on a folder of 1-band 16-bit PNGs and on one of
    //! 13-band 16-bit TIFFs (Sentinel-2's band count and reflectance scale), then used to predict.

    use std::path::Path;
    use std::process::{Command, Output};

    use resnet_rs::{Arch, ModelCard, Preprocess, ResNet, ResNetConfig, Stem};
    use tiff::encoder::TiffEncoder;
    use tiff::encoder::colortype::ColorType;
    use tiff::tags::{PhotometricInterpretation, SampleFormat};

    const BIN: &str = env!("CARGO_BIN_EXE_resnet");

    /// Thirteen 16-bit bands per pixel, as a Sentinel-2 L1C tile stores them.
    struct Bands13;
    impl ColorType for Bands13 {
        type Inner = u16;
        const TIFF_VALUE: PhotometricInterpretation = PhotometricInterpretation::BlackIsZero;
        const BITS_PER_SAMPLE: &'static [u16] = &[16; 13];
        const SAMPLE_FORMAT: &'static [SampleFormat] = &[SampleFormat::Uint; 13];
        fn horizontal_predict(row: &[u16], result: &mut Vec<u16>) {
            result.extend_from_slice(row);
        }
    }

    /// A small RGB checkpoint (resnet18 layout, CIFAR stem, widths 8..64) with a card for 16x16 images.
    fn rgb_checkpoint(path: &Path) {
        let arch: Arch = "resnet18".parse().unwrap();
        let config = ResNetConfig { stem: Stem::Cifar, widths: [8, 16, 32, 64], ..ResNetConfig::new(arch, 10) };
        let model = ResNet::new(config, 3);
        let card = ModelCard {
            arch,
            stem: Stem::Cifar,
            classes: None,
            preprocess: Preprocess { size: 16, resize: 16, ..Preprocess::imagenet() },
        };
        resnet_rs::save_model(&model, path, &card.to_metadata().unwrap()).unwrap();
    }

    /// Pixel (x, y) of band b of image i of class c: the classes differ in brightness.
    fn level(c: usize, i: usize, b: usize, x: u32, y: u32) -> u16 {
        let noise = (x as usize * 131 + y as usize * 71 + i * 17 + b * 29) % 1000;
        (c * 4000 + noise * 3) as u16
    }

    fn run(args: &[&str]) -> Output {
        Command::new(BIN).args(args).output().expect("the binary runs")
    }

    fn text(b: &[u8]) -> String {
        String::from_utf8_lossy(b).into_owned()
    }

    fn fine_tune(data: &Path, weights: &Path, out: &Path, extra: &[&str]) -> String {
        let mut args = vec!["train", "--data", data.to_str().unwrap(), "--weights", weights.to_str().unwrap()];
        args.extend(["--epochs", "1", "--batch-size", "4", "--val-fraction", "0.25", "--out", out.to_str().unwrap()]);
        args.extend(extra);
        let o = run(&args);
        assert!(o.status.success(), "train failed: {}", text(&o.stderr));
        text(&o.stderr)
    }

    #[test]
    fn grey_16_bit_pngs_fine_tune_an_rgb_checkpoint_and_predict() {
        let tmp = tempfile::tempdir().unwrap();
        let weights = tmp.path().join("rgb.safetensors");
        rgb_checkpoint(&weights);
        let data = tmp.path().join("xray");
        for (c, class) in ["normal", "opacity"].iter().enumerate() {
            std::fs::create_dir_all(data.join(class)).unwrap();
            for i in 0..6 {
                let img = image::ImageBuffer::<image::Luma<u16>, _>::from_fn(16, 16, |x, y| {
                    image::Luma([level(c, i, 0, x, y)])
                });
                img.save(data.join(class).join(format!("{i}.png"))).unwrap();
            }
        }
        let out = tmp.path().join("run");
        let log = fine_tune(&data, &weights, &out, &["--in-channels", "1"]);
        assert!(log.contains("conv1 adapted from 3 to 1 input channels"), "{log}");

        let best = out.join("best.safetensors");
        let opened = resnet_rs::open_model(&best, None, resnet_rs::Variant::Live).unwrap();
        assert_eq!(opened.model.config.in_channels, 1);
        assert_eq!(opened.card.preprocess.channels, 1);
        assert_eq!(opened.card.preprocess.mean.len(), 1, "the RGB mean averaged for one channel");

        let image = data.join("opacity/0.png");
        let o = run(&["predict", "--weights", best.to_str().unwrap(), "--json", image.to_str().unwrap()]);
        assert!(o.status.success(), "{}", text(&o.stderr));
        let line: serde_json::Value = serde_json::from_str(text(&o.stdout).trim()).unwrap();
        let label = line["top"][0]["label"].as_str().unwrap();
        assert!(["normal", "opacity"].contains(&label), "{label}");

        // A DICOM CT slice (modality LUT, then its window) predicts with the same network.
        let ct = super::common::fixture("dicom/ct_window_rle.dcm");
        let o = run(&["predict", "--weights", best.to_str().unwrap(), "--window", "40,400", ct.to_str().unwrap()]);
        assert!(o.status.success(), "{}", text(&o.stderr));

        // An RGB photo into the 1-channel network: one line naming both counts, exit 2.
        let rgb = super::common::fixture("images/cat.png");
        let o = run(&["predict", "--weights", best.to_str().unwrap(), rgb.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(2));
        let err = text(&o.stderr);
        assert!(err.contains("cat.png") && err.contains("3 bands but the network takes 1 channel"), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }

    #[test]
    fn thirteen_band_tiffs_fine_tune_an_rgb_checkpoint_and_predict() {
        let tmp = tempfile::tempdir().unwrap();
        let weights = tmp.path().join("rgb.safetensors");
        rgb_checkpoint(&weights);
        let data = tmp.path().join("eurosat");
        for (c, class) in ["forest", "river"].iter().enumerate() {
            std::fs::create_dir_all(data.join(class)).unwrap();
            for i in 0..6 {
                let mut pixels = Vec::with_capacity(16 * 16 * 13);
                for y in 0..16 {
                    for x in 0..16 {
                        pixels.extend((0..13).map(|b| level(c, i, b, x, y)));
                    }
                }
                let file = std::fs::File::create(data.join(class).join(format!("{i}.tif"))).unwrap();
                TiffEncoder::new(file).unwrap().write_image::<Bands13>(16, 16, &pixels).unwrap();
            }
        }
        let out = tmp.path().join("run");
        let mean = vec!["0.3"; 13].join(",");
        let log = fine_tune(
            &data,
            &weights,
            &out,
            &["--in-channels", "13", "--pixel-scale", "10000", "--mean", &mean, "--std", "0.2"],
        );
        assert!(log.contains("conv1 adapted from 3 to 13 input channels"), "{log}");

        let best = out.join("best.safetensors");
        let opened = resnet_rs::open_model(&best, None, resnet_rs::Variant::Live).unwrap();
        assert_eq!(opened.model.config.in_channels, 13);
        assert_eq!(opened.card.preprocess.pixel_scale, Some(10000.0));
        assert_eq!(opened.card.preprocess.mean, vec![0.3; 13]);
        let image = data.join("river/1.tif");
        let o = run(&["predict", "--weights", best.to_str().unwrap(), "--json", image.to_str().unwrap()]);
        assert!(o.status.success(), "{}", text(&o.stderr));
    }
}
