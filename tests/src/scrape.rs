//! One scrape of a Prometheus text endpoint (the service's `--metrics-addr`), parsed into
//! series and values, so tests assert on numbers as a dashboard would read them.

use crate::client::Client;
use crate::{Error, Result};

/// Every sample of one scrape: (`name{labels}` exactly as exposed, value).
#[derive(Debug, Clone)]
pub struct Scrape {
    pub samples: Vec<(String, f64)>,
    /// The exposition text, for assertion messages.
    pub text: String,
}

impl Scrape {
    /// GET `url` (`http://IP:PORT/metrics`) and parse it. A non-200 answer, or a line that
    /// is not `SERIES VALUE`, is an error.
    pub fn get(url: &str) -> Result<Scrape> {
        let reply = Client::new("").get(url, &[])?;
        if reply.status != 200 {
            return Err(Error::new(format!("GET {url}: {}", reply.describe())));
        }
        if !reply
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/plain; version=0.0.4"))
        {
            return Err(Error::new(format!(
                "GET {url}: not the Prometheus text format: {:?}",
                reply.header("content-type")
            )));
        }
        Scrape::parse(&reply.body)
    }

    pub fn parse(text: &str) -> Result<Scrape> {
        let mut samples = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let parsed = line
                .rsplit_once(' ')
                .and_then(|(series, v)| Some((series.to_string(), v.parse::<f64>().ok()?)));
            match parsed {
                Some(s) => samples.push(s),
                None => return Err(Error::new(format!("not a sample line: {line:?}"))),
            }
        }
        Ok(Scrape {
            samples,
            text: text.to_string(),
        })
    }

    /// The value of one series, named exactly (`name` or `name{label="v",...}`).
    pub fn value(&self, series: &str) -> Option<f64> {
        self.samples
            .iter()
            .find(|(s, _)| s == series)
            .map(|(_, v)| *v)
    }

    /// [`Scrape::value`], with an error naming the series when it is absent (the service
    /// creates every series at start, so absent is a bug, not a 0).
    pub fn must(&self, series: &str) -> Result<f64> {
        self.value(series)
            .ok_or_else(|| Error::new(format!("no series {series} in\n{}", self.text)))
    }

    /// The series of metric `name` (with any labels), with their values.
    pub fn family(&self, name: &str) -> Vec<(String, f64)> {
        self.samples
            .iter()
            .filter(|(s, _)| s == name || s.starts_with(&format!("{name}{{")))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_samples_and_refuses_garbage() {
        let s = Scrape::parse(
            "# HELP a_total A.\n# TYPE a_total counter\na_total{k=\"v w\"} 3\nb 1.5\n",
        )
        .unwrap();
        assert_eq!(s.value("a_total{k=\"v w\"}"), Some(3.0));
        assert_eq!(s.value("b"), Some(1.5));
        assert_eq!(s.family("a_total").len(), 1);
        assert!(s.must("c").is_err());
        assert!(Scrape::parse("oops\n").is_err());
    }
}
