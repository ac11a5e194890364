//! Per-tenant usage on the control port: `GET /api/lumen/usage` answers what each tenant used,
//! per model and UTC day, as the head counted it ([`crate::api::edge::usage`]): requests by
//! outcome, refusals by the key's limits by reason, and prompt, completion and cached tokens.
//!
//! Query parameters, all optional: `start` and `end` (UTC dates `YYYY-MM-DD`, inclusive),
//! `tenant`, `model` (exact names; `model=` selects requests refused before their model was
//! known). A bad value, a repeated or unknown parameter, or an `end` before `start` is a 400 in
//! the control API's shape, naming the parameter in `field`.
//!
//! Usage is what tenants are charged for, so this read needs the admin token when one is
//! configured, as the mutating routes do ([`super::serve_api::authorize`]).

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use super::ControlState;
use super::error::ControlError;
use super::serve_api::authorize;
use crate::api::edge::usage::{UsageFilter, UsageRow};
use crate::clock::{date_of_day, day_of_date};

/// `GET /api/lumen/usage`.
pub async fn get_usage(
    State(state): State<ControlState>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<Value>, ControlError> {
    authorize(&state, &headers)?;
    let Query(pairs) = query.map_err(|e| ControlError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let filter = parse_filter(&pairs)?;
    let ledger = state.applications.api().usage();
    let rows: Vec<Value> = ledger.rows(&filter).iter().map(UsageRow::to_json).collect();
    Ok(Json(json!({
        "start": filter.first_day.map(date_of_day),
        "end": filter.last_day.map(date_of_day),
        "tenant": filter.tenant,
        "model": filter.model,
        "retention_days": ledger.retention_days(),
        "usage": rows,
    })))
}

fn bad(field: &str, message: String) -> ControlError {
    ControlError { status: StatusCode::BAD_REQUEST, message, field: Some(field.to_string()) }
}

/// The filter the query's `pairs` ask for.
fn parse_filter(pairs: &[(String, String)]) -> Result<UsageFilter, ControlError> {
    let mut filter = UsageFilter::default();
    let mut seen: Vec<&str> = Vec::new();
    for (name, value) in pairs {
        if seen.contains(&name.as_str()) {
            return Err(bad(name, format!("{name}: given more than once")));
        }
        seen.push(name);
        let date =
            || day_of_date(value).ok_or_else(|| bad(name, format!("{name}: {value:?} is not a UTC date YYYY-MM-DD")));
        match name.as_str() {
            "start" => filter.first_day = Some(date()?),
            "end" => filter.last_day = Some(date()?),
            "tenant" => filter.tenant = Some(value.clone()),
            "model" => filter.model = Some(value.clone()),
            _ => {
                return Err(bad(name, format!("{name}: unknown parameter (known: start, end, tenant, model)")));
            }
        }
    }
    if let (Some(first), Some(last)) = (filter.first_day, filter.last_day)
        && last < first
    {
        return Err(bad("end", format!("end: {} is before start {}", date_of_day(last), date_of_day(first))));
    }
    Ok(filter)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(query: &[(&str, &str)]) -> Vec<(String, String)> {
        query.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_query_becomes_a_filter() {
        let filter =
            parse_filter(&pairs(&[("start", "2026-03-01"), ("end", "2026-03-02"), ("tenant", "acme"), ("model", "")]))
                .unwrap();
        let expected = UsageFilter {
            first_day: Some(20_513),
            last_day: Some(20_514),
            tenant: Some("acme".into()),
            model: Some(String::new()),
        };
        assert_eq!(filter, expected);
        assert_eq!(parse_filter(&[]).unwrap(), UsageFilter::default());
    }

    #[test]
    fn bad_parameters_name_their_field() {
        let cases = [
            (vec![("start", "yesterday")], "start"),
            (vec![("end", "2026-02-30")], "end"),
            (vec![("start", "2026-03-02"), ("end", "2026-03-01")], "end"),
            (vec![("tenant", "a"), ("tenant", "b")], "tenant"),
            (vec![("day", "2026-03-01")], "day"),
        ];
        for (query, field) in cases {
            let e = parse_filter(&pairs(&query)).expect_err(field);
            assert_eq!((e.status, e.field.as_deref()), (StatusCode::BAD_REQUEST, Some(field)), "{}", e.message);
        }
    }
}
