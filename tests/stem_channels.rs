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
